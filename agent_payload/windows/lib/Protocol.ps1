# Stillpoint Windows agent: the JSON-lines protocol (docs/protocol.md), version 1.
#
# request  = {"v": 1, "id": <int|str>, "op": <name>, "args": {...}}
# response = {"v": 1, "id": <same>, "ok": true,  "result": {...}, "duration_ms": <int>}
#          | {"v": 1, "id": <same>, "ok": false, "error": {"code", "message", "writer"?},
#             "duration_ms": <int>}
# The error codes are the Linux agent's (agent_payload/linux/stillpoint_agent/protocol.py).

$script:ProtocolVersion = 1
$script:ErrBadRequest = 'bad-request'
$script:ErrUnsupportedVersion = 'unsupported-version'
$script:ErrUnknownOp = 'unknown-op'
$script:ErrBadState = 'bad-state'
$script:ErrWriterFailed = 'writer-failed'
$script:ErrInternal = 'internal'

function Invoke-NativeCommand {
    # A Windows tool's output (stdout and stderr, as strings) and exit code. Under the
    # agent's $ErrorActionPreference = 'Stop', Windows PowerShell 5.1 turns the first stderr
    # line of `& tool.exe 2>&1` into a terminating error; here the preference is Continue
    # (this function's scope only) so stderr is output and the exit code decides.
    param([Parameter(Mandatory = $true)][string]$FilePath, [string[]]$ArgumentList = @())
    $ErrorActionPreference = 'Continue'
    $output = @(& $FilePath @ArgumentList 2>&1 | ForEach-Object { [string]$_ })
    return [pscustomobject]@{ Output = $output; ExitCode = $LASTEXITCODE }
}

function New-AgentError {
    param(
        [Parameter(Mandatory = $true)][string]$Code,
        [Parameter(Mandatory = $true)][string]$Message,
        [string]$Writer = ''
    )
    # A terminating error whose TargetObject carries the protocol fields.
    $err = [ordered]@{ code = $Code; message = $Message }
    if ($Writer) { $err['writer'] = $Writer }
    $exception = New-Object System.Exception($Message)
    $record = New-Object System.Management.Automation.ErrorRecord(
        $exception, 'StillpointAgentError', [System.Management.Automation.ErrorCategory]::InvalidOperation, $err)
    return $record
}

function ConvertTo-AgentJson {
    param([Parameter(Mandatory = $true)]$Value)
    # -Depth 10: writer metadata nests writer -> components -> files.
    return (ConvertTo-Json -InputObject $Value -Depth 10 -Compress)
}

function Read-AgentRequest {
    param([string]$Line)
    try {
        $request = ConvertFrom-Json -InputObject $Line
    } catch {
        throw (New-AgentError -Code $script:ErrBadRequest -Message "request is not JSON: $($_.Exception.Message)")
    }
    if ($null -eq $request -or -not ($request.PSObject.Properties.Name -contains 'op')) {
        throw (New-AgentError -Code $script:ErrBadRequest -Message "request must be an object with a string 'op'")
    }
    return $request
}

function Get-JsonProperty {
    # Strict mode refuses a missing property; JSON objects from the appliance may omit any.
    param($Object, [string]$Name, $Default = $null)
    if ($null -ne $Object -and $Object.PSObject.Properties.Name -contains $Name) { return $Object.$Name }
    return $Default
}

function Get-RequestArg {
    param($Request, [string]$Name, $Default = $null)
    if ($Request.PSObject.Properties.Name -contains 'args' -and $null -ne $Request.args) {
        if ($Request.args.PSObject.Properties.Name -contains $Name) { return $Request.args.$Name }
    }
    return $Default
}

function New-AgentResponse {
    param($Id, [bool]$Ok, $Result, $ErrorInfo, [int]$DurationMs)
    $response = [ordered]@{ v = $script:ProtocolVersion; id = $Id; ok = $Ok; duration_ms = $DurationMs }
    if ($Ok) { $response['result'] = $Result } else { $response['error'] = $ErrorInfo }
    return $response
}

function Invoke-AgentRequest {
    # One request line in, one response object out; never throws.
    param([string]$Line, [hashtable]$Handlers)
    $watch = [System.Diagnostics.Stopwatch]::StartNew()
    $id = $null
    try {
        $request = Read-AgentRequest -Line $Line
        if ($request.PSObject.Properties.Name -contains 'id') { $id = $request.id }
        $version = 1
        if ($request.PSObject.Properties.Name -contains 'v') { $version = [int]$request.v }
        if ($version -ne $script:ProtocolVersion) {
            throw (New-AgentError -Code $script:ErrUnsupportedVersion -Message "protocol version $version is not supported (1)")
        }
        if (-not $Handlers.ContainsKey([string]$request.op)) {
            throw (New-AgentError -Code $script:ErrUnknownOp -Message "unknown op '$($request.op)'")
        }
        $result = & $Handlers[[string]$request.op] $request
        return (New-AgentResponse -Id $id -Ok $true -Result $result -DurationMs $watch.ElapsedMilliseconds)
    } catch {
        $info = $_.TargetObject
        if (-not ($info -is [System.Collections.IDictionary] -and $info.Contains('code'))) {
            $info = [ordered]@{ code = $script:ErrInternal; message = "$($_.Exception.Message) at $($_.InvocationInfo.PositionMessage)" }
        }
        return (New-AgentResponse -Id $id -Ok $false -ErrorInfo $info -DurationMs $watch.ElapsedMilliseconds)
    }
}
