"""Static checks of the PowerShell agent: no Windows PowerShell runs here, so the scripts are
parsed with a real PowerShell grammar (tree-sitter-powershell) and checked for what a
parser can prove: syntax, Windows PowerShell 5.1 compatibility (no PowerShell 7 syntax),
every command either defined in the payload or a known 5.1 cmdlet / Windows tool, the
manifest current, the protocol's operation set equal to the Linux agent's, and no
dependency on the appliance."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

try:  # a test dependency (see docs/windows.md); a clear failure, never a silent skip
    import tree_sitter
    import tree_sitter_powershell
except ImportError as err:  # pragma: no cover - only on a machine without the test deps
    raise ImportError("pip install tree-sitter tree-sitter-powershell (test dependency of "
                      "the Windows agent checks)") from err

from appliance.guest import winrm_deploy, winrm_push

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = ROOT / "agent_payload" / "windows"
SCRIPTS = sorted(PAYLOAD.rglob("*.ps1"))
PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))

# Cmdlets of Windows PowerShell 5.1 (Microsoft.PowerShell.* modules present everywhere),
# the Exchange management snap-in's, and the Windows tools the agent runs.
KNOWN_COMMANDS = {
    "Add-Content", "ConvertFrom-Json", "ConvertTo-Json", "ForEach-Object", "Get-Command",
    "Get-Content", "Get-Date", "Get-ItemProperty", "Get-PSSnapin", "Add-PSSnapin",
    "Get-Service", "Get-WmiObject", "Join-Path", "Move-Item", "New-Item", "New-Object",
    "Out-Null", "Out-String", "Remove-Item", "Restart-Service", "Select-Object", "Set-Content",
    "Set-ItemProperty", "Set-StrictMode", "Sort-Object", "Split-Path", "Start-Sleep",
    "Test-Path", "Where-Object",
    "Get-MailboxDatabase", "Mount-Database",
    "dfsrdiag.exe", "diskshadow.exe", "eseutil.exe", "icacls.exe", "schtasks.exe",
    "vssadmin.exe",
}


def parse(source: bytes) -> tree_sitter.Tree:
    return PARSER.parse(source)


def nodes(tree: tree_sitter.Tree) -> list[tree_sitter.Node]:
    out, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children)
    return out


def problems(source: bytes) -> list[str]:
    return [f"{n.type} at line {n.start_point[0] + 1}: {n.text[:60]!r}"
            for n in nodes(parse(source)) if n.type == "ERROR" or n.is_missing]


def test_the_payload_has_the_scripts() -> None:
    names = {p.relative_to(PAYLOAD).as_posix() for p in SCRIPTS}
    assert {"stillpoint-agent.ps1", "lib/Protocol.ps1", "lib/VssWriters.ps1",
            "lib/SqlServer.ps1", "lib/Exchange.ps1", "lib/ActiveDirectory.ps1",
            "lib/Install.ps1", "lib/Session.ps1", "lib/Restore.ps1"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    assert problems(script.read_bytes()) == []


@pytest.mark.parametrize("script", [
    winrm_push.receiver_script(r"C:\x\y.bin", "0" * 64),
    winrm_deploy.prepare_dir_script(r"C:\ProgramData\Stillpoint\agent"),
    winrm_deploy.remove_script(r"C:\ProgramData\Stillpoint\agent"),
    winrm_deploy.leftovers_script(r"C:\ProgramData\Stillpoint\agent"),
], ids=["receiver", "prepare-dir", "remove", "leftovers"])
def test_appliance_side_snippets_parse(script: str) -> None:
    assert problems(script.encode()) == []


@pytest.mark.parametrize("broken", [
    b"function F { if ($a { 1 } }\n",
    b"$h = @{ a = 1\n",
    b"$x = $a ? 1 : 2\n",            # PowerShell 7 ternary: not 5.1
    b"$x = $null ?? 'd'\n",          # PowerShell 7 null-coalescing
])
def test_the_parser_catches_errors(broken: bytes) -> None:
    assert problems(broken) != [] or parse(broken).root_node.has_error


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_powershell7_syntax(script: Path) -> None:
    tree = parse(script.read_bytes())
    assert [n.text for n in nodes(tree) if n.type == "pipeline_chain_tail"] == []  # && ||
    text = script.read_text()
    assert "?." not in re.sub(r"'[^']*'|\"[^\"]*\"", "", text)
    assert "-Parallel" not in text and "#requires -version 7" not in text.lower()


def test_every_command_is_defined_or_known() -> None:
    called, defined = set(), set()
    for script in SCRIPTS:
        for n in nodes(parse(script.read_bytes())):
            if n.type == "command_name":
                called.add(n.text.decode())
            elif n.type == "function_name":
                defined.add(n.text.decode())
    assert called - defined - KNOWN_COMMANDS == set()
    assert len(defined) > 40


def test_entry_script_loads_exactly_the_lib_modules() -> None:
    entry = (PAYLOAD / "stillpoint-agent.ps1").read_text()
    loaded = re.findall(r"'(lib/\w+\.ps1)'", entry)
    assert sorted(loaded) == sorted(p.relative_to(PAYLOAD).as_posix()
                                    for p in (PAYLOAD / "lib").glob("*.ps1"))


def test_manifest_is_current() -> None:
    res = subprocess.run([sys.executable, str(PAYLOAD / "build_manifest.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    listed = [ln.split("  ", 1)[1] for ln in (PAYLOAD / "MANIFEST.sha256").read_text().splitlines()]
    assert listed == sorted(p.relative_to(PAYLOAD).as_posix() for p in SCRIPTS)


def test_manifest_check_detects_a_change(tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "windows"
    shutil.copytree(PAYLOAD, copy)
    (copy / "lib" / "Session.ps1").write_text("# changed\n")
    res = subprocess.run([sys.executable, str(copy / "build_manifest.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "stale" in res.stderr


def test_operations_match_the_linux_agent() -> None:
    linux = ROOT / "agent_payload" / "linux" / "stillpoint_agent" / "protocol.py"
    ops = set(re.findall(r'"([a-z-]+)"', linux.read_text().split("OPS = (")[1].split(")")[0]))
    entry = (PAYLOAD / "stillpoint-agent.ps1").read_text()
    handlers = entry[entry.index("$script:Handlers = @{"):entry.index("function Write-AgentLine")]
    assert set(re.findall(r"^    '([a-z-]+)' = \{", handlers, re.M)) == ops


def test_error_codes_match_the_linux_agent() -> None:
    linux = (ROOT / "agent_payload" / "linux" / "stillpoint_agent" / "protocol.py").read_text()
    ps = (PAYLOAD / "lib" / "Protocol.ps1").read_text()
    for code in re.findall(r"^\$script:Err\w+ = '([a-z-]+)'", ps, re.M):
        assert f'"{code}"' in linux, code


def test_payload_is_independent_of_the_appliance() -> None:
    for path in PAYLOAD.rglob("*"):
        if path.is_file() and path.suffix in (".ps1", ".py"):
            text = path.read_text()
            assert not re.search(r"^\s*(from|import)\s+appliance", text, re.M), path
            assert "appliance." not in text or path.suffix == ".ps1", path


def test_native_commands_never_redirect_stderr_under_stop() -> None:
    """Windows PowerShell 5.1 with $ErrorActionPreference = 'Stop' (the agent's) turns the
    first stderr line of `& tool.exe 2>&1` (or `2>$null`) into a terminating error: every
    Windows tool runs through Invoke-NativeCommand, the one place allowed to redirect."""
    offenders = []
    for script in SCRIPTS:
        tree = parse(script.read_bytes())
        for n in nodes(tree):
            if n.type != "function_statement":
                continue
            name = next((c.text.decode() for c in n.children if c.type == "function_name"), "")
            if name == "Invoke-NativeCommand":
                continue
            for line_no, line in enumerate(n.text.decode().splitlines(), n.start_point[0] + 1):
                code = line.split("#", 1)[0]
                if re.search(r"\s2>(&1|\$null)", code):
                    offenders.append(f"{script.name}:{line_no} in {name}: {line.strip()}")
    assert offenders == []


def test_exchange_logs_are_never_truncated_by_a_later_vss_session() -> None:
    text = "\n".join(s.read_text() for s in SCRIPTS)
    assert "begin backup" not in text and "Invoke-ExchangeLogTruncation" not in text
