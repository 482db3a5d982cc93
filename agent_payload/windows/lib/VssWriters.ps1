# VSS writers: `vssadmin list writers` (state) and `diskshadow list writers detailed`
# (components and files), parsed by structure rather than by label so that localised
# output still yields the writer name, ids and the numeric state.
#
# The same grammar is implemented in appliance/guest/winrm_vss.py, where it is tested
# against recorded outputs (tests/cassettes/winrm/outputs/); keep the two in step.

# VSS_WRITER_STATE (vss.h): 1 stable; 2-5 waiting; 6-15 failed at some phase.
$script:VssStateNames = @{
    0 = 'unknown'; 1 = 'stable'; 2 = 'waiting for freeze'; 3 = 'waiting for thaw';
    4 = 'waiting for post snapshot'; 5 = 'waiting for backup complete';
    6 = 'failed at identify'; 7 = 'failed at prepare backup'; 8 = 'failed at prepare snapshot';
    9 = 'failed at freeze'; 10 = 'failed at thaw'; 11 = 'failed at post snapshot';
    12 = 'failed at backup complete'; 13 = 'failed at pre restore'; 14 = 'failed at post restore';
    15 = 'failed at backup shutdown'
}

function ConvertFrom-VssadminWriters {
    param([string[]]$Lines)
    $writers = New-Object System.Collections.ArrayList
    $current = $null
    foreach ($raw in $Lines) {
        $line = $raw.Trim()
        if ($line -match "^[^:]+:\s*'(.+)'\s*$") {
            $current = [ordered]@{ name = $Matches[1]; writer_id = ''; instance_id = ''; state = 0; state_name = 'unknown'; last_error = '' }
            [void]$writers.Add($current)
            continue
        }
        if ($null -eq $current) { continue }
        if ($line -match '^[^:]+:\s*(\{[0-9a-fA-F-]{36}\})\s*$') {
            if (-not $current['writer_id']) { $current['writer_id'] = $Matches[1].ToLowerInvariant() }
            else { $current['instance_id'] = $Matches[1].ToLowerInvariant() }
        } elseif ($line -match '^[^:]+:\s*\[(\d+)\]\s*(.*)$') {
            $current['state'] = [int]$Matches[1]
            $current['state_name'] = $script:VssStateNames[[int]$Matches[1]]
            if (-not $current['state_name']) { $current['state_name'] = $Matches[2] }
        } elseif ($current['state'] -ne 0 -and -not $current['last_error'] -and $line -match '^[^:]+:\s*(.+)$') {
            $current['last_error'] = $Matches[1].Trim()
        }
    }
    return , $writers.ToArray()
}

function Get-VssWriters {
    # vssadmin needs an elevated token; under WinRM an administrator's token is elevated.
    $run = Invoke-NativeCommand -FilePath 'vssadmin.exe' -ArgumentList @('list', 'writers')
    if ($run.ExitCode -ne 0) {
        throw (New-AgentError -Code $script:ErrWriterFailed -Message "vssadmin list writers failed ($($run.ExitCode)): $($run.Output -join ' ')" -Writer 'vss')
    }
    return (ConvertFrom-VssadminWriters -Lines $run.Output)
}

function Test-VssWritersStable {
    # Every writer must be stable (state 1); the first one that is not fails the attempt.
    param([object[]]$Writers, [string]$Phase)
    foreach ($w in $Writers) {
        if ([int]$w['state'] -ne 1) {
            throw (New-AgentError -Code $script:ErrWriterFailed -Writer $w['name'] -Message ("VSS writer '{0}' is in state [{1}] {2} (last error: {3}) {4}" -f $w['name'], $w['state'], $w['state_name'], $w['last_error'], $Phase))
        }
    }
}

function ConvertFrom-DiskshadowWriters {
    # `list writers detailed`: '* WRITER "name"', then '- key = value' and '+ Component "x"'
    # blocks; the lines indented under 'Paths affected by this component:' are file paths.
    param([string[]]$Lines)
    $writers = New-Object System.Collections.ArrayList
    $writer = $null
    $component = $null
    $inPaths = $false
    foreach ($raw in $Lines) {
        $line = $raw.Trim()
        if ($line -match '^\*\s*WRITER\s+"(.+)"') {
            $writer = [ordered]@{ name = $Matches[1]; writer_id = ''; restore_method = ''; components = (New-Object System.Collections.ArrayList) }
            [void]$writers.Add($writer)
            $component = $null; $inPaths = $false
            continue
        }
        if ($null -eq $writer) { continue }
        if ($line -match '^\+\s*Component\s+"(.+)"') {
            $component = [ordered]@{ id = $Matches[1]; name = ''; logical_path = ''; type = ''; selectable = $false; paths = (New-Object System.Collections.ArrayList) }
            [void]$writer['components'].Add($component)
            $inPaths = $false
            continue
        }
        if ($line -match '^-\s*Writer ID\s*=\s*(\{[0-9a-fA-F-]{36}\})') { $writer['writer_id'] = $Matches[1].ToLowerInvariant(); continue }
        if ($line -match '^-\s*Restore method\s*=\s*(\S+)') { $writer['restore_method'] = $Matches[1]; continue }
        if ($null -eq $component) { continue }
        if ($line -match '^-\s*Paths affected by this component:') { $inPaths = $true; continue }
        if ($line -match '^-\s*(Volumes affected|Component Dependencies)') { $inPaths = $false; continue }
        if ($inPaths -and $line -match '^-\s*(.+)$') { [void]$component['paths'].Add($Matches[1].Trim()); continue }
        if ($line -match '^-\s*Name:\s*(.*)$') { $component['name'] = $Matches[1].Trim(); continue }
        if ($line -match '^-\s*Logical path:\s*(.*)$') { $component['logical_path'] = $Matches[1].Trim(); continue }
        if ($line -match '^-\s*Type:\s*(\S+)') { $component['type'] = $Matches[1]; continue }
        if ($line -match '^-\s*Is selectable:\s*(TRUE|FALSE)') { $component['selectable'] = ($Matches[1] -eq 'TRUE'); continue }
    }
    return , $writers.ToArray()
}

function Get-VssWriterComponents {
    # diskshadow reads its commands from a script file; /l writes nothing we need.
    $script = Join-Path $env:TEMP ("stillpoint-ds-{0}.txt" -f [guid]::NewGuid())
    Set-Content -LiteralPath $script -Value 'list writers detailed' -Encoding ASCII
    try {
        $run = Invoke-NativeCommand -FilePath 'diskshadow.exe' -ArgumentList @('/s', $script)
    } finally {
        Remove-Item -LiteralPath $script -Force -ErrorAction SilentlyContinue
    }
    if ($run.ExitCode -ne 0) { return @() }
    return (ConvertFrom-DiskshadowWriters -Lines $run.Output)
}
