"""GuestChannel over the vSphere guest operations API: for guests with no network path.

VMware Tools runs the commands; the appliance only talks to vCenter/ESXi:
  put_file     InitiateFileTransferToGuest, then an HTTPS PUT of the bytes to the URL it
               returns (TLS verified with the vSphere CA bundle or pinned thumbprint);
  run          StartProgramInGuest of `cmd.exe /c` with stdout/stderr redirected into temp
               files in the guest (stdin, if any, is uploaded and redirected in), polled
               with ListProcessesInGuest until it has an exit code, the files fetched with
               InitiateFileTransferFromGuest and deleted;
  open_process there is no stdin to stream, so the agent runs once per request
               (`-Mode once -RequestFile … -ResponseFile …`, its attempt state kept in a file
               in its install directory): `write_line` stages a request, `read_line` runs
               it and returns the response line.

Windows guests only (the Linux agent is reached over SSH). Errors become GuestError /
AuthenticationFailed / TrustError; vim faults never leave this module.
"""

from __future__ import annotations

import hashlib
import json
import ntpath
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from pyVmomi import vim

from appliance.errors import AuthenticationFailed, GuestError, TrustError, UsageError
from appliance.guest.channel import RunResult

_POLL_S = 0.5
_TEMP = r"C:\Windows\Temp"


@dataclass(frozen=True)
class GuestOpsOptions:
    username: str
    password: str = field(repr=False)
    vsphere_host: str = ""           # replaces the "*" host vCenter may put in transfer URLs
    ca_bundle: str | None = None     # how the ESXi/vCenter HTTPS certificate is verified
    thumbprint_sha256: str | None = None


def _fault_text(err: Exception) -> str:
    return getattr(err, "msg", None) or type(err).__name__


def _quote(argv: Sequence[str]) -> str:
    return subprocess.list2cmdline(list(argv))


class GuestOpsProcess:
    """AgentStream for the agent in `-Mode once`: one guest process per request."""

    def __init__(self, channel: GuestOpsChannel, argv: Sequence[str]) -> None:
        if "-Mode" not in argv:
            raise UsageError("guest operations can only run the agent one request at a time")
        i = list(argv).index("-Mode")
        self._base = [*argv[:i], "-Mode", "once", *argv[i + 2:]]
        self._channel = channel
        self._pending: list[str] = []
        self._stderr = ""
        self._closed = False

    def write_line(self, line: str) -> None:
        self._pending.append(line)

    def read_line(self, timeout: float) -> str | None:
        if self._closed or not self._pending:
            return None
        line = self._pending.pop(0)
        tag = uuid.uuid4().hex
        req = ntpath.join(_TEMP, f"sp-req-{tag}.json")
        resp = ntpath.join(_TEMP, f"sp-resp-{tag}.json")
        ch = self._channel
        ch.put_file(line.encode("utf-8"), req)
        try:
            res = ch.run([*self._base, "-RequestFile", req, "-ResponseFile", resp],
                         timeout=timeout)
            self._stderr += res.stderr.decode("utf-8", "replace")
            if not res.ok:
                raise GuestError(f"agent request failed in the guest (exit {res.exit_code}): "
                                 f"{res.text()[-500:]}")
            answer = ch.get_file(resp).decode("utf-8").strip()
        finally:
            ch.delete_files([req, resp])
        if json.loads(line).get("op") == "uninstall":
            self._closed = True
        return answer

    def stderr_text(self) -> str:
        return self._stderr

    def close(self) -> int | None:
        self._closed = True
        return 0


class GuestOpsChannel:
    def __init__(self, content: Any, vm: Any, options: GuestOpsOptions) -> None:
        self._content = content
        self._vm = vm
        self.options = options
        self._auth = vim.vm.guest.NamePasswordAuthentication(
            username=options.username, password=options.password, interactiveSession=False)
        self._http = requests.Session()
        self._http.trust_env = False   # no CA bundle or proxy from the environment
        self._verify: bool | str = options.ca_bundle or True
        if options.thumbprint_sha256:
            from appliance.guest.winrm_channel import _PinnedAdapter, normalise_thumbprint

            self._verify = False  # replaced by the pin: a wrong certificate is refused
            self._http.mount("https://", _PinnedAdapter(normalise_thumbprint(
                options.thumbprint_sha256)))

    @property
    def _files(self) -> Any:
        return self._content.guestOperationsManager.fileManager

    @property
    def _processes(self) -> Any:
        return self._content.guestOperationsManager.processManager

    def _vim(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except vim.fault.InvalidGuestLogin as err:
            raise AuthenticationFailed(f"guest operations: the guest rejected the login for "
                                       f"{self.options.username}") from err
        except (vim.fault.GuestOperationsUnavailable, vim.fault.GuestOperationsFault,
                vim.fault.InvalidState, vim.fault.TaskInProgress) as err:
            raise GuestError(f"guest operations: {what} failed: {_fault_text(err)}") from err
        except vim.fault.FileFault as err:
            raise GuestError(f"guest operations: {what}: {_fault_text(err)}") from err

    def _url(self, url: str) -> str:
        parts = urlsplit(url)
        if parts.hostname == "*" and self.options.vsphere_host:
            netloc = parts.netloc.replace("*", self.options.vsphere_host, 1)
            return urlunsplit(parts._replace(netloc=netloc))
        return url

    def _transfer(self, method: str, url: str, data: bytes | None = None) -> bytes:
        try:
            r = self._http.request(method, self._url(url), data=data, timeout=120,
                                   verify=self._verify)
            r.raise_for_status()
            return r.content
        except requests.exceptions.SSLError as err:
            raise TrustError(f"guest file transfer: certificate not trusted: {err}") from err
        except requests.RequestException as err:
            raise GuestError(f"guest file transfer {method} failed: {err}") from err

    # --- GuestChannel -------------------------------------------------------------------
    def put_file(self, source: Path | bytes, remote: str, mode: int = 0o600) -> None:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        url = self._vim("upload", self._files.InitiateFileTransferToGuest, vm=self._vm,
                        auth=self._auth, guestFilePath=remote,
                        fileAttributes=vim.vm.guest.FileManager.WindowsFileAttributes(),
                        fileSize=len(data), overwrite=True)
        self._transfer("PUT", url, data)
        back = self.get_file(remote)
        if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
            raise GuestError(f"guest operations: {remote} does not read back as written")

    def get_file(self, remote: str) -> bytes:
        info = self._vim("download", self._files.InitiateFileTransferFromGuest, vm=self._vm,
                         auth=self._auth, guestFilePath=remote)
        return self._transfer("GET", info.url)

    def delete_files(self, paths: Sequence[str]) -> None:
        for path in paths:
            try:
                self._files.DeleteFileInGuest(vm=self._vm, auth=self._auth, filePath=path)
            except vim.fault.FileNotFound:
                pass
            except vim.fault.VimFault as err:
                raise GuestError(f"guest operations: cannot delete {path}: {_fault_text(err)}"
                                 ) from err

    def run(self, argv: Sequence[str], stdin: bytes | None = None, sudo: bool | None = None,
            timeout: float = 60.0) -> RunResult:
        if sudo:
            raise UsageError("sudo has no meaning in a Windows guest")
        tag = uuid.uuid4().hex
        out, err, inp = (ntpath.join(_TEMP, f"sp-{tag}.{s}") for s in ("out", "err", "in"))
        redirect = f' > "{out}" 2> "{err}"'
        if stdin is not None:
            self.put_file(stdin, inp)
            redirect += f' < "{inp}"'
        spec = vim.vm.guest.ProcessManager.WindowsProgramSpec(
            programPath=r"C:\Windows\System32\cmd.exe",
            arguments=f'/S /C "{_quote(argv)}{redirect}"')
        pid = self._vim("start", self._processes.StartProgramInGuest, vm=self._vm,
                        auth=self._auth, spec=spec)
        deadline = time.monotonic() + timeout
        try:
            while True:
                [proc] = self._vim("poll", self._processes.ListProcessesInGuest, vm=self._vm,
                                   auth=self._auth, pids=[pid])
                if proc.endTime is not None:
                    code = int(proc.exitCode)
                    break
                if time.monotonic() > deadline:
                    self._processes.TerminateProcessInGuest(vm=self._vm, auth=self._auth, pid=pid)
                    raise GuestError(f"guest operations: {argv[0]} did not finish in "
                                     f"{timeout:.0f} s")
                time.sleep(_POLL_S)
            return RunResult(tuple(argv), code, self.get_file(out), self.get_file(err))
        finally:
            self.delete_files([out, err] + ([inp] if stdin is not None else []))

    def open_process(self, argv: Sequence[str], sudo: bool | None = None) -> GuestOpsProcess:
        if sudo:
            raise UsageError("sudo has no meaning in a Windows guest")
        return GuestOpsProcess(self, argv)

    def close(self) -> None:
        self._http.close()
