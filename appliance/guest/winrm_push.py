"""The guest half of a WinRM file push: a PowerShell receiver fed base64 lines on stdin.

Wire format on the receiver's stdin (one Send envelope per line):

    <base64 of up to chunk_size() raw bytes>\n    ... repeated ...
    .\n                                             end of file

The receiver writes `<path>.part`, computes its sha256, and renames it onto `<path>` only if
the hash is the expected one; it prints one JSON line `{"ok":bool,"sha256":"<hex>"}`.
"""

from __future__ import annotations

END_MARKER = "."
# Room for the WS-Man header and the <rsp:Send> wrapper around the stream.
_ENVELOPE_OVERHEAD = 4096
RECEIVER_TAG = "# stillpoint:receiver v1"


def chunk_size(max_envelope_kb: int) -> int:
    """Raw bytes per line: our base64 (4/3), then pywinrm's base64 of the stream (4/3)."""
    budget = max_envelope_kb * 1024 - _ENVELOPE_OVERHEAD
    raw = budget * 9 // 16
    return max(3, raw - raw % 3)


def ps_quote(value: str) -> str:
    """A PowerShell single-quoted literal: only the quote itself needs doubling."""
    return "'" + value.replace("'", "''") + "'"


def receiver_script(remote_path: str, sha256_hex: str) -> str:
    return f"""{RECEIVER_TAG}
$ErrorActionPreference = 'Stop'
$path = {ps_quote(remote_path)}
$expected = {ps_quote(sha256_hex)}
$dir = Split-Path -Parent $path
if ($dir -and -not (Test-Path -LiteralPath $dir)) {{
    New-Item -ItemType Directory -Force -Path $dir | Out-Null
}}
$part = $path + '.part'
$stream = [System.IO.File]::Open($part, [System.IO.FileMode]::Create)
try {{
    while ($true) {{
        $line = [Console]::In.ReadLine()
        if ($null -eq $line -or $line -eq '{END_MARKER}') {{ break }}
        $bytes = [System.Convert]::FromBase64String($line)
        $stream.Write($bytes, 0, $bytes.Length)
    }}
}} finally {{
    $stream.Close()
}}
$sha = [System.Security.Cryptography.SHA256]::Create()
$reader = [System.IO.File]::OpenRead($part)
try {{
    $digest = [System.BitConverter]::ToString($sha.ComputeHash($reader))
    $actual = $digest.Replace('-', '').ToLowerInvariant()
}} finally {{
    $reader.Close()
}}
if ($actual -ne $expected) {{
    Remove-Item -LiteralPath $part -Force
    [Console]::Out.WriteLine('{{"ok":false,"sha256":"' + $actual + '","error":"hash mismatch"}}')
    exit 3
}}
Move-Item -LiteralPath $part -Destination $path -Force
[Console]::Out.WriteLine('{{"ok":true,"sha256":"' + $actual + '"}}')
exit 0
"""
