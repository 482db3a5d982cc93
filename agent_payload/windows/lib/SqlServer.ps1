# SQL Server: instances, databases and their log-backup history (from msdb), log
# truncation with BACKUP LOG ... TO DISK = 'NUL', and post-restore checks.
#
# Queries use System.Data.SqlClient from the .NET Framework (present on every PowerShell
# 5.1 machine) with Windows authentication: the agent's account must be a SQL sysadmin
# (or hold BACKUP LOG and VIEW SERVER STATE) - no SQL password is ever handled.

$script:SqlInstanceKey = 'HKLM:\SOFTWARE\Microsoft\Microsoft SQL Server\Instance Names\SQL'

function Get-SqlInstances {
    if (-not (Test-Path -LiteralPath $script:SqlInstanceKey)) { return @() }
    $key = Get-ItemProperty -LiteralPath $script:SqlInstanceKey
    $instances = New-Object System.Collections.ArrayList
    foreach ($prop in $key.PSObject.Properties) {
        if ($prop.Name -like 'PS*') { continue }
        $name = $prop.Name
        $service = if ($name -eq 'MSSQLSERVER') { 'MSSQLSERVER' } else { 'MSSQL$' + $name }
        $server = if ($name -eq 'MSSQLSERVER') { '.' } else { '.\' + $name }
        $svc = Get-Service -Name $service -ErrorAction SilentlyContinue
        $running = ($null -ne $svc -and $svc.Status -eq 'Running')
        [void]$instances.Add([ordered]@{ name = $name; server = $server; service = $service; running = $running })
    }
    return , $instances.ToArray()
}

function Invoke-SqlQuery {
    param([string]$Server, [string]$Query, [int]$TimeoutSeconds = 60)
    $connection = New-Object System.Data.SqlClient.SqlConnection("Server=$Server;Database=master;Integrated Security=SSPI;Application Name=stillpoint-agent;Connect Timeout=15")
    try {
        $connection.Open()
        $command = $connection.CreateCommand()
        $command.CommandText = $Query
        $command.CommandTimeout = $TimeoutSeconds
        $reader = $command.ExecuteReader()
        $rows = New-Object System.Collections.ArrayList
        while ($reader.Read()) {
            $row = [ordered]@{}
            for ($i = 0; $i -lt $reader.FieldCount; $i++) {
                $value = $reader.GetValue($i)
                if ($value -is [System.DBNull]) { $value = $null }
                elseif ($value -is [datetime]) { $value = $value.ToUniversalTime().ToString('o') }
                $row[$reader.GetName($i)] = $value
            }
            [void]$rows.Add($row)
        }
        $reader.Close()
        return , $rows.ToArray()
    } finally {
        $connection.Dispose()
    }
}

# One row per database: recovery model, state, and the newest log and full backups with
# who took them (user, software, device). The appliance decides truncation from these.
$script:SqlDatabasesQuery = @'
SELECT d.name, d.recovery_model_desc AS recovery_model, d.state_desc AS state,
       d.is_read_only, CAST(CASE WHEN d.replica_id IS NULL THEN 0 ELSE 1 END AS bit) AS in_availability_group,
       lb.backup_finish_date AS last_log_backup, lb.user_name AS last_log_backup_user,
       lb.software_name AS last_log_backup_software, lb.physical_device_name AS last_log_backup_device,
       fb.backup_finish_date AS last_full_backup, fb.software_name AS last_full_backup_software,
       STUFF((SELECT '|' + mf.physical_name FROM sys.master_files mf
              WHERE mf.database_id = d.database_id FOR XML PATH('')), 1, 1, '') AS files
FROM sys.databases d
OUTER APPLY (SELECT TOP 1 b.backup_finish_date, b.user_name, ms.software_name, f.physical_device_name
             FROM msdb.dbo.backupset b
             JOIN msdb.dbo.backupmediafamily f ON f.media_set_id = b.media_set_id
             JOIN msdb.dbo.backupmediaset ms ON ms.media_set_id = b.media_set_id
             WHERE b.database_name = d.name AND b.type = 'L'
             ORDER BY b.backup_finish_date DESC) lb
OUTER APPLY (SELECT TOP 1 b.backup_finish_date, ms.software_name
             FROM msdb.dbo.backupset b
             JOIN msdb.dbo.backupmediaset ms ON ms.media_set_id = b.media_set_id
             WHERE b.database_name = d.name AND b.type = 'D' AND b.is_copy_only = 0
             ORDER BY b.backup_finish_date DESC) fb
WHERE d.database_id <> 2
'@

function Get-SqlDatabases {
    param([string]$Server)
    $rows = Invoke-SqlQuery -Server $Server -Query $script:SqlDatabasesQuery
    foreach ($row in $rows) {
        $row['files'] = @(([string]$row['files']).Split('|') | Where-Object { $_ })
    }
    return , $rows
}

function Get-SqlMetadata {
    $instances = Get-SqlInstances
    $result = New-Object System.Collections.ArrayList
    foreach ($instance in $instances) {
        $entry = [ordered]@{ instance = $instance['name']; running = $instance['running']; databases = @(); error = $null }
        if ($instance['running']) {
            try { $entry['databases'] = Get-SqlDatabases -Server $instance['server'] }
            catch { $entry['error'] = $_.Exception.Message }
        }
        [void]$result.Add($entry)
    }
    return , $result.ToArray()
}

function ConvertTo-SqlIdentifier {
    param([string]$Name)
    return '[' + $Name.Replace(']', ']]') + ']'
}

function Invoke-SqlLogTruncation {
    # $Target: {instance, database, last_log_backup} as chosen by the appliance's policy.
    # Guard: if a log backup newer than the one the decision saw has appeared, another tool
    # is active on this chain - skip, never break someone else's chain.
    param($Target)
    $instance = Get-SqlInstances | Where-Object { $_['name'] -eq $Target.instance } | Select-Object -First 1
    if ($null -eq $instance) { return [ordered]@{ database = $Target.database; done = $false; reason = "instance $($Target.instance) not found" } }
    $now = Get-SqlDatabases -Server $instance['server'] | Where-Object { $_['name'] -eq $Target.database } | Select-Object -First 1
    if ($null -eq $now) { return [ordered]@{ database = $Target.database; done = $false; reason = 'database not found' } }
    if ([string]$now['last_log_backup'] -ne [string]$Target.last_log_backup) {
        return [ordered]@{ database = $Target.database; done = $false; reason = "a log backup by $($now['last_log_backup_user']) ($($now['last_log_backup_software'])) appeared at $($now['last_log_backup']); skipped" }
    }
    $sql = 'BACKUP LOG ' + (ConvertTo-SqlIdentifier $Target.database) + " TO DISK = N'NUL' WITH NAME = N'stillpoint log truncation'"
    [void](Invoke-SqlQuery -Server $instance['server'] -Query $sql -TimeoutSeconds 3600)
    return [ordered]@{ database = $Target.database; instance = $Target.instance; done = $true; reason = 'log truncated (BACKUP LOG TO NUL)' }
}

function Test-SqlAfterRestore {
    # SQL Server runs crash recovery by itself at start; we wait for every database to be
    # ONLINE and, on request, run DBCC CHECKDB.
    param([bool]$CheckDb, [int]$WaitSeconds = 600)
    $report = New-Object System.Collections.ArrayList
    foreach ($instance in (Get-SqlInstances)) {
        $deadline = (Get-Date).AddSeconds($WaitSeconds)
        $states = @()
        do {
            try {
                $states = Invoke-SqlQuery -Server $instance['server'] -Query 'SELECT name, state_desc FROM sys.databases'
                $pending = @($states | Where-Object { $_['state_desc'] -in @('RECOVERING', 'RECOVERY_PENDING') })
            } catch {
                $pending = @('not reachable')
            }
            if ($pending.Count -eq 0) { break }
            Start-Sleep -Seconds 5
        } while ((Get-Date) -lt $deadline)
        foreach ($db in $states) {
            $entry = [ordered]@{ instance = $instance['name']; database = $db['name']; state = $db['state_desc']; checkdb = $null }
            if ($CheckDb -and $db['state_desc'] -eq 'ONLINE' -and $db['name'] -ne 'tempdb') {
                try {
                    [void](Invoke-SqlQuery -Server $instance['server'] -Query ('DBCC CHECKDB (' + (ConvertTo-SqlIdentifier $db['name']) + ') WITH NO_INFOMSGS') -TimeoutSeconds 86400)
                    $entry['checkdb'] = 'ok'
                } catch {
                    $entry['checkdb'] = $_.Exception.Message
                }
            }
            [void]$report.Add($entry)
        }
    }
    return , $report.ToArray()
}
