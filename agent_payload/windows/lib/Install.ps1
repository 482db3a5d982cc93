# Install-time concerns: the manifest check, the first-boot scheduled task, the restore
# marker (guestinfo) and removing every trace of the agent from a live guest.

$script:TaskPath = '\Stillpoint\'
$script:TaskName = 'RestoreOnBoot'
$script:MarkerKey = 'guestinfo.stillpoint.restore'
$script:ResultKey = 'guestinfo.stillpoint.restore.result'

function Get-FileSha256 {
    param([string]$Path)
    $sha = [System.Security.Cryptography.SHA256]::Create()
    $stream = [System.IO.File]::OpenRead($Path)
    try { return ([System.BitConverter]::ToString($sha.ComputeHash($stream))).Replace('-', '').ToLowerInvariant() }
    finally { $stream.Close() }
}

function Test-AgentManifest {
    # Every file named in MANIFEST.sha256 must be present with its hash; returns the list.
    param([string]$Root)
    $manifest = Join-Path $Root 'MANIFEST.sha256'
    if (-not (Test-Path -LiteralPath $manifest)) { throw "MANIFEST.sha256 missing in $Root" }
    $files = New-Object System.Collections.ArrayList
    foreach ($line in (Get-Content -LiteralPath $manifest)) {
        if (-not $line.Trim()) { continue }
        if ($line -notmatch '^([0-9a-f]{64})  (.+)$') { throw "malformed manifest line: $line" }
        $expected = $Matches[1]
        $relative = $Matches[2]
        $path = Join-Path $Root ($relative.Replace('/', '\'))
        if (-not (Test-Path -LiteralPath $path)) { throw "payload file missing: $relative" }
        $actual = Get-FileSha256 -Path $path
        if ($actual -ne $expected) { throw "payload file $relative has sha256 $actual, manifest says $expected" }
        [void]$files.Add($relative)
    }
    return , $files.ToArray()
}

function Protect-InstallDirectory {
    # Only SYSTEM and Administrators: the agent runs as SYSTEM at boot.
    param([string]$Root)
    & icacls.exe $Root /inheritance:r /grant:r '*S-1-5-18:(OI)(CI)F' '*S-1-5-32-544:(OI)(CI)F' | Out-Null
    if ($LASTEXITCODE -ne 0) { throw "icacls failed on $Root ($LASTEXITCODE)" }
}

function Register-RestoreTask {
    param([string]$Root)
    $agent = Join-Path $Root 'stillpoint-agent.ps1'
    $action = "powershell.exe -NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass -File `"$agent`" -Mode boot"
    # schtasks works on every Windows that runs PowerShell 5.1 (the ScheduledTasks module
    # does not exist on 2008 R2 with WMF 5.1).
    & schtasks.exe /Create /F /TN ($script:TaskPath + $script:TaskName) /SC ONSTART /RU SYSTEM /RL HIGHEST /TR $action | Out-Null
    if ($LASTEXITCODE -ne 0) { throw (New-AgentError -Code $script:ErrInternal -Message "schtasks /Create failed ($LASTEXITCODE)") }
    return [ordered]@{ task = $script:TaskPath + $script:TaskName; action = $action }
}

function Unregister-RestoreTask {
    $query = Invoke-NativeCommand -FilePath 'schtasks.exe' -ArgumentList @('/Query', '/TN', ($script:TaskPath + $script:TaskName))
    if ($query.ExitCode -ne 0) { return [ordered]@{ task = $script:TaskPath + $script:TaskName; removed = $false } }
    & schtasks.exe /Delete /F /TN ($script:TaskPath + $script:TaskName) | Out-Null
    return [ordered]@{ task = $script:TaskPath + $script:TaskName; removed = ($LASTEXITCODE -eq 0) }
}

function Get-VmToolsd {
    $path = Join-Path $env:ProgramFiles 'VMware\VMware Tools\vmtoolsd.exe'
    if (Test-Path -LiteralPath $path) { return $path }
    return $null
}

function Get-RestoreMarker {
    # guestinfo.stillpoint.restore, set by the appliance in the restored VM's extraConfig.
    $tools = Get-VmToolsd
    if ($null -eq $tools) { return $null }
    # stderr is part of the output here: a marker is one JSON line on stdout, so any stderr
    # text makes the JSON unreadable and the marker is treated as absent.
    $run = Invoke-NativeCommand -FilePath $tools -ArgumentList @('--cmd', "info-get $script:MarkerKey")
    if ($run.ExitCode -ne 0 -or -not $run.Output) { return $null }
    try { return (ConvertFrom-Json -InputObject (($run.Output | Out-String).Trim())) } catch { return $null }
}

function Set-RestoreResult {
    param($Result)
    $tools = Get-VmToolsd
    if ($null -eq $tools) { return }
    $json = ConvertTo-AgentJson $Result
    & $tools --cmd "info-set $script:ResultKey $json" | Out-Null
}

function Remove-AgentInstallation {
    # Called as the last act of a live session: the task, then the directory. The running
    # script file can be deleted on Windows because PowerShell has read it into memory.
    param([string]$Root)
    $task = Unregister-RestoreTask
    $removed = $true
    try { Remove-Item -LiteralPath $Root -Recurse -Force -ErrorAction Stop }
    catch { $removed = -not (Test-Path -LiteralPath $Root) }
    return [ordered]@{ boot_task = $task; directory = $Root; removed = $removed }
}
