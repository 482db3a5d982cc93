# Exchange: mailbox databases and log paths (the facts the appliance records), and the
# post-restore header check / soft recovery / remount.
#
# Stillpoint does not truncate Exchange logs. The only way to make the Exchange writer
# truncate is a FULL VSS backup session; one held after the restore point is committed (the
# snapshot itself is a COPY backup, so nothing truncates before the commit) truncates up to
# *that* session's checkpoint, removing logs written after the backed-up point too, and with
# them any roll-forward past the image. Logs are left to Exchange (circular logging) or to the
# product that owns the log chain; docs/windows.md says so.

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

function Get-EseDatabaseState {
    param([string]$EdbFile)
    $output = (Invoke-NativeCommand -FilePath 'eseutil.exe' -ArgumentList @('/mh', $EdbFile)).Output
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
                $run = Invoke-NativeCommand -FilePath 'eseutil.exe' -ArgumentList @('/r', $db.log_prefix, "/l$($db.log_folder)", "/s$($db.system_folder)", "/d$folder", '/i')
                $entry['recovery'] = if ($run.ExitCode -eq 0) { 'soft recovery completed' } else { "eseutil /r failed: $($run.Output[-1])" }
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
