# First boot after a restore (the scheduled task runs `stillpoint-agent.ps1 -Mode boot`):
# read the marker, run each application's post-restore procedure once, report through
# guestinfo and a log file, then remove the task and the agent.
#
# Marker: {"restore_point": id, "restore_id": id, "ad_mode": "auto"|"registry"|"skip",
#          "sql_checkdb": bool, "writers": {<name>: <metadata stored with the restore point>}}

function Invoke-FirstBootRestore {
    param([string]$Root)
    $log = Join-Path $Root 'restore.log'
    $marker = Get-RestoreMarker
    if ($null -eq $marker) {
        # Not a Stillpoint restore (the live VM rebooted with the agent present): clean up.
        return (Remove-AgentInstallation -Root $Root)
    }
    $doneFile = Join-Path $Root ('restore-done-' + ([string](Get-JsonProperty $marker 'restore_id' 'none') -replace '[^A-Za-z0-9_.-]', '_'))
    if (Test-Path -LiteralPath $doneFile) { return [ordered]@{ skipped = 'already ran for this restore' } }
    $writers = Get-JsonProperty $marker 'writers'
    $result = [ordered]@{ restore_point = (Get-JsonProperty $marker 'restore_point'); restore_id = (Get-JsonProperty $marker 'restore_id'); ok = $true; steps = [ordered]@{} }
    $adMode = [string](Get-JsonProperty $marker 'ad_mode' 'auto')
    $checkDb = [bool](Get-JsonProperty $marker 'sql_checkdb' $false)
    $exchangeDbs = @(Get-JsonProperty (Get-JsonProperty $writers 'exchange') 'databases' @())
    $steps = @(
        @{ name = 'active-directory'; run = { if ($adMode -ne 'skip') { Restore-ActiveDirectory -Mode $adMode -SavedMetadata (Get-JsonProperty $writers 'active-directory') } } },
        @{ name = 'exchange'; run = { Restore-ExchangeDatabases -Databases $exchangeDbs } },
        @{ name = 'sql-server'; run = { Test-SqlAfterRestore -CheckDb $checkDb } }
    )
    foreach ($step in $steps) {
        try {
            $result['steps'][$step.name] = & $step.run
        } catch {
            $result['ok'] = $false
            $result['steps'][$step.name] = [ordered]@{ error = $_.Exception.Message }
        }
        Add-Content -LiteralPath $log -Value ((Get-Date).ToUniversalTime().ToString('o') + ' ' + $step.name + ' ' + (ConvertTo-AgentJson $result['steps'][$step.name]))
    }
    Set-RestoreResult -Result $result
    Set-Content -LiteralPath $doneFile -Value (ConvertTo-AgentJson $result)
    if ($result['ok']) { [void](Unregister-RestoreTask) }
    return $result
}
