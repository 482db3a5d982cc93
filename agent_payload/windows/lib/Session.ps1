# One backup attempt on Windows: writers checked before the snapshot, the snapshot taken by
# VMware Tools' VSS requestor (copy type), writers re-checked after, truncation on request.
#
# Why the agent does not freeze by itself: on Windows the application writers freeze in
# VSS, and VMware Tools is the VSS requestor that the vSphere snapshot drives
# (CreateSnapshotEx_Task with a WindowsQuiesceSpec, vssBackupType = COPY). `freeze` here
# checks and records; `thaw` verifies that every writer came through the snapshot.

$script:State = 'idle'
$script:Writers = $null
$script:BeforeWriters = @()
$script:Failure = $null
$script:Durations = [ordered]@{}
$script:Results = [ordered]@{}
$script:Completed = $null
$script:FrozenAt = $null        # UTC time the snapshot window opened
$script:DeadlineSeconds = 60.0

function Get-AgentStatus {
    $writerStates = [ordered]@{}
    foreach ($w in $script:BeforeWriters) {
        $writerStates[$w['name']] = [ordered]@{ kind = 'vss'; state = $w['state_name']; error = $(if ($w['last_error'] -eq 'No error') { $null } else { $w['last_error'] }) }
    }
    return [ordered]@{
        state = $script:State; writers = $writerStates; skipped = @(); durations = $script:Durations
        results = $script:Results; failure = $script:Failure; completed = $script:Completed
    }
}

function Set-AttemptFailed {
    param($ErrorRecord)
    $script:State = 'failed'
    $script:Failure = $ErrorRecord.TargetObject
    throw $ErrorRecord
}

function Get-WindowsMetadata {
    $raw = (Invoke-NativeCommand -FilePath 'vssadmin.exe' -ArgumentList @('list', 'writers')).Output
    $vss = ConvertFrom-VssadminWriters -Lines $raw
    $components = @{}
    foreach ($w in (Get-VssWriterComponents)) { $components[$w['name']] = $w }
    $docs = New-Object System.Collections.ArrayList
    foreach ($w in $vss) {
        $detail = $components[$w['name']]
        $comps = @(); $files = @(); $method = 'vss'
        if ($null -ne $detail) {
            $comps = @($detail['components'] | ForEach-Object { [ordered]@{ name = $_['name']; logical_path = $_['logical_path']; type = $_['type']; selectable = $_['selectable'] } })
            $files = @($detail['components'] | ForEach-Object { $_['paths'] })
            if ($detail['restore_method']) { $method = $detail['restore_method'] }
        }
        [void]$docs.Add([ordered]@{ name = 'vss:' + $w['name']; kind = 'vss'; writer_id = $w['writer_id']; state = $w['state_name']; last_error = $w['last_error']; components = $comps; files = $files; restore_method = $method })
    }
    $sql = Get-SqlMetadata
    if ($sql.Count -gt 0) {
        [void]$docs.Add([ordered]@{ name = 'sql-server'; kind = 'sqlserver'; components = $sql; files = @($sql | ForEach-Object { $_['databases'] } | ForEach-Object { $_['files'] }); restore_method = 'SQL Server crash recovery at start; DBCC CHECKDB on request' })
    }
    $exchange = Get-ExchangeMetadata
    if ($exchange.Count -gt 0) {
        [void]$docs.Add([ordered]@{ name = 'exchange'; kind = 'exchange'; databases = $exchange; components = $exchange; files = @($exchange | ForEach-Object { $_['edb_file']; $_['log_folder'] }); restore_method = 'eseutil /mh header check, soft recovery (eseutil /r), Mount-Database' })
    }
    $ad = Get-ActiveDirectoryMetadata
    if ($ad['domain_controller']) {
        [void]$docs.Add([ordered]@{ name = 'active-directory'; kind = 'active-directory'; components = @($ad); files = @($ad['ntds_database'], $ad['ntds_logs']); invocation_id = $ad['invocation_id']; restore_method = 'non-authoritative restore (VM-GenerationID safeguards, else Database restored from backup + SYSVOL non-authoritative sync)' })
    }
    return [ordered]@{ writers = $docs.ToArray(); skipped = @(); raw = [ordered]@{ vssadmin_list_writers = ($raw -join "`n") } }
}

function Invoke-Prepare {
    if ($script:State -in @('prepared', 'frozen')) { throw (New-AgentError -Code $script:ErrBadState -Message "an attempt is already $($script:State)") }
    $script:Failure = $null; $script:Results = [ordered]@{}; $script:Durations = [ordered]@{}; $script:Completed = $null
    $watch = [System.Diagnostics.Stopwatch]::StartNew()
    $script:BeforeWriters = Get-VssWriters
    try { Test-VssWritersStable -Writers $script:BeforeWriters -Phase 'before the snapshot' }
    catch { Set-AttemptFailed $_ }
    $script:Durations['prepare_ms'] = $watch.ElapsedMilliseconds
    $script:State = 'prepared'
    return (Get-AgentStatus)
}

function Invoke-Freeze {
    param($TimeoutSeconds)
    if ($script:State -ne 'prepared') { throw (New-AgentError -Code $script:ErrBadState -Message "freeze needs a prepared attempt (state: $($script:State))") }
    $script:DeadlineSeconds = 60.0
    if ($null -ne $TimeoutSeconds -and [double]$TimeoutSeconds -lt 60.0) { $script:DeadlineSeconds = [double]$TimeoutSeconds }
    $script:FrozenAt = (Get-Date).ToUniversalTime()
    $script:State = 'frozen'
    $status = Get-AgentStatus
    $status['deadline_s'] = $script:DeadlineSeconds
    # The appliance must take the snapshot with VMware Tools quiescing, copy type.
    $status['quiesce'] = [ordered]@{ by = 'vmware-tools-vss'; snapshot_quiesce = $true; vss_backup_type = 'copy' }
    return $status
}

function Invoke-Thaw {
    if ($script:State -ne 'frozen') { throw (New-AgentError -Code $script:ErrBadState -Message "thaw needs a frozen attempt (state: $($script:State))") }
    $held = ((Get-Date).ToUniversalTime() - $script:FrozenAt).TotalSeconds
    $script:Durations['held_ms'] = [int]($held * 1000)
    $after = Get-VssWriters
    $before = @{}
    foreach ($w in $script:BeforeWriters) { $before[$w['name']] = $w }
    foreach ($w in $after) {
        $was = $before[$w['name']]
        $newError = ($w['last_error'] -ne 'No error') -and ($null -eq $was -or $was['last_error'] -ne $w['last_error'])
        if ([int]$w['state'] -ne 1 -or $newError) {
            Set-AttemptFailed (New-AgentError -Code $script:ErrWriterFailed -Writer $w['name'] -Message ("VSS writer '{0}' after the snapshot: state [{1}] {2}, last error: {3}" -f $w['name'], $w['state'], $w['state_name'], $w['last_error']))
        }
    }
    if ($held -gt $script:DeadlineSeconds) {
        $script:State = 'failed'
        $script:Failure = [ordered]@{ code = 'freeze-expired'; message = ('the snapshot window lasted {0:N1} s, over its {1:N1} s limit' -f $held, $script:DeadlineSeconds) }
        throw (New-AgentError -Code 'freeze-expired' -Message $script:Failure['message'])
    }
    $script:BeforeWriters = $after
    # Facts after the snapshot, for the appliance's truncation decision.
    $script:Results['sql-server'] = [ordered]@{ kind = 'sqlserver'; instances = (Get-SqlMetadata) }
    $script:Results['exchange'] = [ordered]@{ kind = 'exchange'; databases = (Get-ExchangeMetadata) }
    $script:State = 'thawed'
    return (Get-AgentStatus)
}

function Invoke-BackupComplete {
    param([bool]$Success, $RestorePoint, [bool]$Truncate, $Targets)
    if ($script:State -in @('prepared', 'frozen')) { throw (New-AgentError -Code $script:ErrBadState -Message "backup-complete during an attempt ($($script:State))") }
    $done = [ordered]@{ sql = @(); exchange = $null; skipped = @() }
    if ($Success -and $Truncate) {
        if ($null -eq $Targets) {
            $done['skipped'] += 'no truncation targets given: nothing truncated'
        } else {
            if ($null -ne (Get-JsonProperty $Targets 'sql')) {
                foreach ($t in @($Targets.sql)) {
                    try { $done['sql'] += (Invoke-SqlLogTruncation -Target $t) }
                    catch { throw (New-AgentError -Code $script:ErrWriterFailed -Writer ('sql:' + $t.database) -Message $_.Exception.Message) }
                }
            }
            if (@(Get-JsonProperty $Targets 'exchange' @()).Count -gt 0) {
                # Never truncated here (lib/Exchange.ps1 says why): refused, not half-done.
                $done['skipped'] += 'Exchange logs are not truncated by Stillpoint (a later full VSS session would remove logs written after the restore point)'
            }
        }
    }
    $script:Completed = [ordered]@{ success = $Success; restore_point = $RestorePoint; truncate = $Truncate; writers = $done }
    $script:State = 'completed'
    return (Get-AgentStatus)
}
