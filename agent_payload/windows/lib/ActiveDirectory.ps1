# Active Directory: is this a domain controller, how SYSVOL replicates (DFSR or FRS), and
# the non-authoritative restore that keeps a restored DC from coming back USN-rolled-back.
#
# Restore decision (first boot after a restore):
#   * Windows Server 2012+ on a hypervisor with VM-GenerationID (the vmgencounter device):
#     the DC sees the new generation id itself, resets its invocationID, discards its RID
#     pool and resyncs SYSVOL non-authoritatively ("virtualization safeguards"). We only
#     verify that it did (Directory Service event 2170 or a changed invocationID).
#   * otherwise: set "Database restored from backup" = 1 under NTDS\Parameters and restart
#     NTDS (it comes back with a new invocationID), and make SYSVOL sync
#     non-authoritatively: FRS with BurFlags = D2, DFSR by toggling msDFSR-Enabled on this
#     DC's SYSVOL subscription and polling AD.
# The appliance powers the restored VM on with its NICs disconnected and connects them
# only after this has reported (guestinfo.stillpoint.restore.result).

$script:NtdsParameters = 'HKLM:\SYSTEM\CurrentControlSet\Services\NTDS\Parameters'
$script:FrsBackupRestore = 'HKLM:\SYSTEM\CurrentControlSet\Services\NtFrs\Parameters\Backup/Restore\Process at Startup'
$script:DfsrSysvolState = 'HKLM:\SYSTEM\CurrentControlSet\Services\DFSR\Parameters\SysVols\Migrating Sysvols'

function Test-DomainController {
    # Win32_ComputerSystem.DomainRole: 4 backup DC, 5 primary DC.
    $role = (Get-WmiObject -Class Win32_ComputerSystem).DomainRole
    return ([int]$role -ge 4)
}

function Get-SysvolReplication {
    # DFSR once the domain's migration reached 'Eliminated' (Local State 3), or on domains
    # created at 2008 functional level or later (DFSR service hosting SYSVOL); else FRS.
    if (Test-Path -LiteralPath $script:DfsrSysvolState) {
        $state = (Get-ItemProperty -LiteralPath $script:DfsrSysvolState -ErrorAction SilentlyContinue).'Local State'
        if ($null -ne $state -and [int]$state -eq 3) { return 'dfsr' }
    }
    $frs = Get-Service -Name NtFrs -ErrorAction SilentlyContinue
    if ($null -ne $frs -and $frs.Status -eq 'Running') { return 'frs' }
    return 'dfsr'
}

function Test-VmGenerationIdSupport {
    $os = [System.Environment]::OSVersion.Version
    if ($os -lt (New-Object System.Version 6, 2)) { return $false }
    $device = Get-WmiObject -Class Win32_PnPEntity -Filter "Service = 'vmgencounter'" -ErrorAction SilentlyContinue
    return ($null -ne $device)
}

function Get-InvocationId {
    $rootDse = [adsi]'LDAP://RootDSE'
    $server = [adsi]('LDAP://' + [string]$rootDse.dsServiceName)
    return ([guid]$server.invocationId.Value).ToString()
}

function Get-ActiveDirectoryMetadata {
    if (-not (Test-DomainController)) { return [ordered]@{ domain_controller = $false } }
    $params = Get-ItemProperty -LiteralPath $script:NtdsParameters
    $invocation = $null
    try { $invocation = Get-InvocationId } catch { $invocation = $null }
    return [ordered]@{
        domain_controller = $true
        ntds_database = [string]$params.'DSA Database file'
        ntds_logs = [string]$params.'Database log files path'
        sysvol_replication = Get-SysvolReplication
        vm_generation_id = Test-VmGenerationIdSupport
        invocation_id = $invocation
    }
}

function Set-FrsNonAuthoritative {
    New-Item -Path $script:FrsBackupRestore -Force | Out-Null
    Set-ItemProperty -LiteralPath $script:FrsBackupRestore -Name BurFlags -Value 0xD2 -Type DWord
    Restart-Service -Name NtFrs -Force
}

function Set-DfsrNonAuthoritative {
    # The DC's SYSVOL subscription: CN=SYSVOL Subscription,CN=Domain System Volume,
    # CN=DFSR-LocalSettings,<computer object>. Disabled, AD polled (DFSR event 4114), then
    # enabled again: DFSR then pulls SYSVOL from a partner (event 4614/4604).
    $rootDse = [adsi]'LDAP://RootDSE'
    $computer = ([adsi]('LDAP://' + [string]$rootDse.dsServiceName)).Parent
    $serverReference = ([adsi]$computer).serverReference
    $subscriptionDn = 'CN=SYSVOL Subscription,CN=Domain System Volume,CN=DFSR-LocalSettings,' + [string]$serverReference
    $subscription = [adsi]('LDAP://' + $subscriptionDn)
    $subscription.Put('msDFSR-Enabled', 'FALSE'); $subscription.SetInfo()
    & dfsrdiag.exe pollad | Out-Null
    Start-Sleep -Seconds 30
    $subscription.Put('msDFSR-Enabled', 'TRUE'); $subscription.SetInfo()
    & dfsrdiag.exe pollad | Out-Null
    return $subscriptionDn
}

function Restore-ActiveDirectory {
    param([string]$Mode = 'auto', $SavedMetadata)
    $report = [ordered]@{ domain_controller = (Test-DomainController); method = $null; sysvol = $null; invocation_id_before = $null; invocation_id_after = $null }
    if (-not $report['domain_controller']) { return $report }
    try { $report['invocation_id_before'] = Get-InvocationId } catch { $report['invocation_id_before'] = $null }
    $saved = [string](Get-JsonProperty $SavedMetadata 'invocation_id' '')
    $genid = Test-VmGenerationIdSupport
    if ($Mode -eq 'auto' -and $genid -and $saved -and $report['invocation_id_before'] -and $report['invocation_id_before'] -ne $saved) {
        # The safeguards already ran: a new invocationID since the backup.
        $report['method'] = 'vm-generation-id'
        $report['invocation_id_after'] = $report['invocation_id_before']
        return $report
    }
    Set-ItemProperty -LiteralPath $script:NtdsParameters -Name 'Database restored from backup' -Value 1 -Type DWord
    Restart-Service -Name NTDS -Force
    $report['method'] = 'database-restored-from-backup'
    if ((Get-SysvolReplication) -eq 'frs') { Set-FrsNonAuthoritative; $report['sysvol'] = 'frs-d2' }
    else { $report['sysvol'] = 'dfsr-non-authoritative: ' + (Set-DfsrNonAuthoritative) }
    try { $report['invocation_id_after'] = Get-InvocationId } catch { $report['invocation_id_after'] = $null }
    if ($report['invocation_id_after'] -and $report['invocation_id_after'] -eq $report['invocation_id_before']) {
        throw (New-AgentError -Code $script:ErrWriterFailed -Writer 'active-directory' -Message 'the invocationID did not change after the non-authoritative restore; keep this DC off the network')
    }
    return $report
}
