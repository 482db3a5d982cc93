<#
.SYNOPSIS
Stillpoint's on-demand Windows guest agent (Windows PowerShell 5.1, nothing to install).

.DESCRIPTION
Modes:
  serve   JSON lines on stdin/stdout (docs/protocol.md), until EOF or `uninstall`.
  boot    first boot after a restore (run by the RestoreOnBoot scheduled task).
  verify  check the payload against MANIFEST.sha256 and exit.
Every mode first checks each file against MANIFEST.sha256 and loads only listed files.
The agent never depends on the appliance's code: the two share a versioned protocol.
#>
[CmdletBinding()]
param(
    [ValidateSet('serve', 'boot', 'verify')][string]$Mode = 'serve'
)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
$script:AgentVersion = '0.1.0'
$script:Root = Split-Path -Parent $MyInvocation.MyCommand.Path

# The manifest check needs no other file: it is repeated here instead of dot-sourced.
function Test-PayloadIntegrity {
    param([string]$Root)
    $listed = @()
    foreach ($line in (Get-Content -LiteralPath (Join-Path $Root 'MANIFEST.sha256'))) {
        if ($line -notmatch '^([0-9a-f]{64})  (.+)$') { continue }
        $path = Join-Path $Root ($Matches[2].Replace('/', '\'))
        $sha = [System.Security.Cryptography.SHA256]::Create()
        $bytes = [System.IO.File]::ReadAllBytes($path)
        $actual = ([System.BitConverter]::ToString($sha.ComputeHash($bytes))).Replace('-', '').ToLowerInvariant()
        if ($actual -ne $Matches[1]) { throw "payload file $($Matches[2]) does not match MANIFEST.sha256" }
        $listed += $Matches[2]
    }
    return $listed
}

$listed = Test-PayloadIntegrity -Root $script:Root
foreach ($module in @('lib/Protocol.ps1', 'lib/VssWriters.ps1', 'lib/SqlServer.ps1', 'lib/Exchange.ps1', 'lib/ActiveDirectory.ps1', 'lib/Install.ps1', 'lib/Session.ps1', 'lib/Restore.ps1')) {
    if ($listed -notcontains $module) { throw "$module is not in MANIFEST.sha256" }
    . (Join-Path $script:Root ($module.Replace('/', '\')))
}

$script:Done = $false
$script:Handlers = @{
    'hello' = {
        param($r)
        $offered = @(Get-RequestArg $r 'versions' @(1))
        if ($offered -notcontains 1) { throw (New-AgentError -Code $script:ErrUnsupportedVersion -Message "agent speaks version 1, client offers $($offered -join ',')") }
        $os = Get-WmiObject -Class Win32_OperatingSystem
        return [ordered]@{
            protocol_version = 1; agent_version = $script:AgentVersion; install_dir = $script:Root
            capabilities = [ordered]@{
                ops = @($script:Handlers.Keys | Sort-Object); max_freeze_s = 60
                writers = @('vss', 'sqlserver', 'exchange', 'active-directory')
                quiesce = 'vmware-tools-vss'
            }
            host = [ordered]@{ hostname = $env:COMPUTERNAME; os = [string]$os.Caption; os_version = [string]$os.Version; powershell = $PSVersionTable.PSVersion.ToString(); domain_controller = (Test-DomainController) }
        }
    }
    'gather-metadata' = { param($r) Get-WindowsMetadata }
    'prepare' = { param($r) Invoke-Prepare }
    'freeze' = { param($r) Invoke-Freeze -TimeoutSeconds (Get-RequestArg $r 'timeout_s') }
    'thaw' = { param($r) Invoke-Thaw }
    'status' = { param($r) Get-AgentStatus }
    'backup-complete' = {
        param($r)
        $success = Get-RequestArg $r 'success'
        if ($success -isnot [bool]) { throw (New-AgentError -Code $script:ErrBadRequest -Message "'success' must be true or false") }
        Invoke-BackupComplete -Success $success -RestorePoint (Get-RequestArg $r 'restore_point') -Truncate ([bool](Get-RequestArg $r 'truncate' $false)) -Targets (Get-RequestArg $r 'targets')
    }
    'install-boot-hook' = { param($r) Protect-InstallDirectory -Root $script:Root; Register-RestoreTask -Root $script:Root }
    'remove-boot-hook' = { param($r) Unregister-RestoreTask }
    'uninstall' = { param($r) $script:Done = $true; Remove-AgentInstallation -Root $script:Root }
}

function Write-AgentLine {
    param($Response)
    [Console]::Out.WriteLine((ConvertTo-AgentJson $Response))
    [Console]::Out.Flush()
}

switch ($Mode) {
    'verify' {
        Write-AgentLine ([ordered]@{ ok = $true; files = $listed })
    }
    'boot' {
        $result = Invoke-FirstBootRestore -Root $script:Root
        Write-AgentLine $result
    }
    'serve' {
        [Console]::OutputEncoding = New-Object System.Text.UTF8Encoding($false)
        while (-not $script:Done) {
            $line = [Console]::In.ReadLine()
            if ($null -eq $line) { break }   # the appliance is gone: nothing of ours is held
            if (-not $line.Trim()) { continue }
            Write-AgentLine (Invoke-AgentRequest -Line $line -Handlers $script:Handlers)
        }
    }
}
