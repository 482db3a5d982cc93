# Exchange: mailbox databases and log paths, log truncation through a full VSS backup
# session (diskshadow), and the post-restore header check / soft recovery / remount.
#
# Why diskshadow: Exchange truncates its logs only when its VSS writer is told a FULL
# backup completed (BackupComplete). VMware Tools takes COPY backups on purpose (so nothing
# truncates before the restore point is committed); once it is, a diskshadow session with
# 'begin backup' / 'create' / 'end backup' (default type FULL, non-persistent shadows that
# vanish when diskshadow exits) makes the Exchange writer truncate.

$script:ExchangeWriterId = '{76fe1ac4-15f7-4bcd-987e-8e1acb462fb7}'

function Import-ExchangeShell {
    # Exchange 2010+ management snap-in; absent on machines without Exchange.
    if (Get-Command Get-MailboxDatabase -ErrorAction SilentlyContinue) { return $true }
    foreach ($snapin in @('Microsoft.Exchange.Management.PowerShell.SnapIn', 'Microsoft.Exchange.Management.PowerShell.E2010')) {
        if (Get-PSSnapin -Registered -Name $snapin -ErrorAction SilentlyContinue) {
            Add-PSSnapin $snapin -ErrorAction SilentlyContinue
            if (Get-Command Get-MailboxDatabase -ErrorAction SilentlyContinue) { return $true }
        }
    }
    return $false
}

function Get-ExchangeMetadata {
    if (-not (Import-ExchangeShell)) { return @() }
    $result = New-Object System.Collections.ArrayList
    foreach ($db in (Get-MailboxDatabase -Server $env:COMPUTERNAME -Status)) {
        [void]$result.Add([ordered]@{
            name = [string]$db.Name
            edb_file = [string]$db.EdbFilePath
            log_folder = [string]$db.LogFolderPath
            log_prefix = [string]$db.LogFilePrefix
            system_folder = [string]$db.SystemFolderPath
            mounted = [bool]$db.Mounted
            circular_logging = [bool]$db.CircularLoggingEnabled
            last_full_backup = if ($db.LastFullBackup) { $db.LastFullBackup.ToUniversalTime().ToString('o') } else { $null }
        })
    }
    return , $result.ToArray()
}

function Get-VolumeOfPath {
    param([string]$Path)
    return ([System.IO.Path]::GetPathRoot($Path)).TrimEnd('\')
}

function New-ExchangeTruncationScript {
    param([object[]]$Databases)
    $volumes = @()
    foreach ($db in $Databases) {
        $volumes += Get-VolumeOfPath $db.edb_file
        $volumes += Get-VolumeOfPath $db.log_folder
    }
    $lines = @('set verbose on', 'set context volatile')
    $i = 0
    foreach ($volume in ($volumes | Sort-Object -Unique)) {
        $lines += "add volume $volume alias stillpoint$i"
        $i++
    }
    $lines += "writer verify $script:ExchangeWriterId"
    $lines += @('begin backup', 'create', 'end backup')
    return $lines
}

function Invoke-ExchangeLogTruncation {
    param([object[]]$Databases)
    $script = Join-Path $env:TEMP ("stillpoint-ex-{0}.dsh" -f [guid]::NewGuid())
    Set-Content -LiteralPath $script -Value (New-ExchangeTruncationScript -Databases $Databases) -Encoding ASCII
    try {
        $output = @(& diskshadow.exe /s $script 2>&1 | ForEach-Object { [string]$_ })
        $code = $LASTEXITCODE
    } finally {
        Remove-Item -LiteralPath $script -Force -ErrorAction SilentlyContinue
    }
    $failed = @($output | Where-Object { $_ -match 'writer.*(failed|error)' -or $_ -match 'VSS_E_' })
    return [ordered]@{
        done = ($code -eq 0 -and $failed.Count -eq 0)
        exit_code = $code
        problems = $failed
        reason = if ($code -eq 0 -and $failed.Count -eq 0) { 'full VSS backup session completed; the Exchange writer truncates' } else { 'diskshadow reported a problem' }
    }
}

function Get-EseDatabaseState {
    param([string]$EdbFile)
    $output = @(& eseutil.exe /mh $EdbFile 2>&1 | ForEach-Object { [string]$_ })
    foreach ($line in $output) {
        if ($line -match '^\s*State:\s*(.+?)\s*$') { return $Matches[1] }
    }
    return 'unknown'
}

function Restore-ExchangeDatabases {
    # After a restore: each database's header must say Clean Shutdown before it mounts;
    # a Dirty Shutdown database gets a soft recovery (eseutil /r) replaying its own logs.
    param([object[]]$Databases)
    $report = New-Object System.Collections.ArrayList
    $shell = Import-ExchangeShell
    foreach ($db in $Databases) {
        $entry = [ordered]@{ database = $db.name; header_before = (Get-EseDatabaseState $db.edb_file); recovery = $null; mounted = $false; error = $null }
        try {
            if ($entry['header_before'] -match 'Dirty') {
                $folder = Split-Path -Parent $db.edb_file
                $out = @(& eseutil.exe /r $db.log_prefix "/l$($db.log_folder)" "/s$($db.system_folder)" "/d$folder" /i 2>&1 | ForEach-Object { [string]$_ })
                $entry['recovery'] = if ($LASTEXITCODE -eq 0) { 'soft recovery completed' } else { "eseutil /r failed: $($out[-1])" }
            }
            $entry['header_after'] = Get-EseDatabaseState $db.edb_file
            if ($shell -and $entry['header_after'] -match 'Clean') {
                Mount-Database -Identity $db.name -Confirm:$false -ErrorAction Stop
                $entry['mounted'] = $true
            }
        } catch {
            $entry['error'] = $_.Exception.Message
        }
        [void]$report.Add($entry)
    }
    return , $report.ToArray()
}
