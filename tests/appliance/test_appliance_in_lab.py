"""The packer-built appliance as a VM of the lab, running a scheduled backup of a guest.

The image (stillpoint_lab/appliance_image.py: cached, or a real `packer build`, 22-25 min
cold under TCG) is booted by the lab's host agent on the lab network beside a lab guest, as
a VM deployed from the template would be: its first boot configures it from
`guestinfo.stillpoint.*` (docs/deploy.md: vCenter address, account, password, the pinned
certificate thumbprint, the administrator's SSH key), logs in to the lab's vCenter and
creates its encrypted repository on its own repository disk. Then, as the administrator on
the appliance (`stillpoint-admin` with the key guestinfo gave it): the guest's SSH access is
added to the profile as docs/profile.md says, `job create` makes the vCenter scheduled task,
`job run` is vCenter's "Run" (the firing comes from vCenter's scheduler), the appliance's own
`stillpoint serve` takes it and backs the guest up application-consistently (its agent
pushed over SSH from the appliance); `job show`, `list` and `check --read-data` on the
appliance say so. `make appliance-test`; not part of `make test`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest

from stillpoint_lab.config import LabConfig, VMSpec

pytestmark = [pytest.mark.lab, pytest.mark.timeout(3 * 3600)]

LAB_ID = 6
GUEST = "lab-vm1"
APPLIANCE = "stillpoint-appliance"
ADMIN = "stillpoint-admin"
REPOSITORY_MOUNT = "/var/lib/stillpoint/repository"
BOOT_TIMEOUT_S = 900        # TCG, first boot: the banner, then first-boot's vCenter login
GUEST_KEY = "/etc/stillpoint/guest-keys/lab-vm1"


@dataclass
class Appliance:
    ssh: paramiko.SSHClient
    ip: str
    lab: Any
    password: str            # the vCenter password it was given: must appear nowhere


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    import os

    if os.geteuid() != 0:
        pytest.skip("the lab needs root (QEMU, taps on a bridge)")
    from stillpoint_lab.lab import lab_down, lab_up

    cfg = LabConfig(lab_id=LAB_ID, vms=(VMSpec(GUEST),))
    lab_down(cfg)
    handle = lab_up(cfg)
    try:
        yield handle
    finally:
        lab_down(cfg)


@pytest.fixture(scope="module")
def appliance(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    import subprocess

    from stillpoint_lab import appliance_image
    from stillpoint_lab.lab import boot_scratch_vm, remove_scratch_vm

    image = appliance_image.ensure_appliance_image(
        progress=lambda m: print(f"  {m}", flush=True))
    tmp = tmp_path_factory.mktemp("appliance-vm")
    system, repo = tmp / "system.raw", tmp / "repository.raw"
    for src, dst in ((image.path, system), (image.repository_path, repo)):
        subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    admin_key = tmp / "admin-key"
    public = appliance_image.new_ssh_key(admin_key, "stillpoint-admin-test")
    cfg, vc = lab.config, lab.vcsim
    guestinfo = {"guestinfo.stillpoint.vcenter": f"{cfg.host_ip}:{vc.port}",
                 "guestinfo.stillpoint.user": vc.user,
                 "guestinfo.stillpoint.password": vc.password,
                 "guestinfo.stillpoint.thumbprint": vc.thumbprint_sha256,
                 "guestinfo.stillpoint.ssh_key": public}
    t0 = time.monotonic()
    try:
        # Booted: its guest agent gave the address and host key, SSH (the lab's splab) with
        # that key pinned works, the repository disk is mounted.
        vm = boot_scratch_vm(cfg, APPLIANCE, [system, repo], sandbox=False, apps=(),
                             memory_mib=1536, guestinfo=guestinfo, timeout=BOOT_TIMEOUT_S,
                             data_mount=REPOSITORY_MOUNT)
        print(f"  appliance up at {vm.ip} in {time.monotonic() - t0:.0f} s", flush=True)
        kind, blob = vm.host_key_line.split()[1:3]
        ssh = paramiko.SSHClient()
        ssh.get_host_keys().add(vm.ip, kind,
                                paramiko.PKey.from_type_string(kind, _b64(blob)))
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        deadline = time.monotonic() + 600
        while True:     # first boot installs the administrator's key after the vCenter login
            try:
                ssh.connect(vm.ip, username=ADMIN, key_filename=str(admin_key),
                            look_for_keys=False, allow_agent=False, timeout=30,
                            banner_timeout=60, auth_timeout=60)
                break
            except paramiko.AuthenticationException:
                assert time.monotonic() < deadline, "first boot never installed the admin key"
                time.sleep(15)     # the appliance rate-limits new SSH connections
        booted = Appliance(ssh=ssh, ip=vm.ip, lab=lab, password=vc.password)
        deadline = time.monotonic() + 600      # the key is in before the unit has finished
        while (state := _run(booted, "systemctl show -P ActiveState stillpoint-firstboot")[1]
               .strip()) == "activating":
            assert time.monotonic() < deadline, "first boot did not finish in 10 minutes"
            time.sleep(5)
        print(f"  first boot {state} after {time.monotonic() - t0:.0f} s", flush=True)
        try:
            yield booted
        finally:
            ssh.close()
    finally:
        remove_scratch_vm(cfg, APPLIANCE)


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def _run(a: Appliance, command: str, *, stdin: str | None = None,
         timeout: float = 120) -> tuple[int, str, str]:
    inp, out, err = a.ssh.exec_command(command, timeout=timeout)
    if stdin is not None:
        inp.write(stdin)
        inp.channel.shutdown_write()
    stdout, stderr = out.read().decode(), err.read().decode()
    return out.channel.recv_exit_status(), stdout, stderr


def _ok(a: Appliance, command: str, **kw: Any) -> str:
    rc, stdout, stderr = _run(a, command, **kw)
    assert rc == 0, f"{command}: exit {rc}: {stdout}{stderr}"
    return stdout


def _add_guest_access(a: Appliance) -> None:
    """What the administrator does for application-aware backups of a Linux guest
    (docs/profile.md "guests"): its SSH key and pinned host key in the appliance's profile,
    then a restart of the service, which reads the profile when it starts."""
    from stillpoint_lab.lab import lab_agent_config, lab_client_key

    guest = a.lab.guests[GUEST]
    key = Path(lab_client_key(a.lab.config)).read_text()
    _ok(a, f"sudo install -d -m 0700 -o stillpoint -g stillpoint $(dirname {GUEST_KEY}) && "
           f"sudo install -m 0600 -o stillpoint -g stillpoint /dev/stdin {GUEST_KEY}",
        stdin=key)
    entry = {"transport": "ssh", "host": guest.ip, "port": 22, "user": guest.ssh_user,
             "key_file": GUEST_KEY, "host_key": guest.host_key_line, "sudo": True,
             "agent": lab_agent_config()}
    script = ("import json, sys; p = '/etc/stillpoint/profile.json'; d = json.load(open(p)); "
              f"d['guests'][{GUEST!r}] = json.loads(sys.stdin.read()); "
              "open(p + '.new', 'w').write(json.dumps(d, indent=2))")
    _ok(a, f"sudo /opt/stillpoint/venv/bin/python -c \"{script}\" && "
           "sudo chown stillpoint:stillpoint /etc/stillpoint/profile.json.new && "
           "sudo chmod 0600 /etc/stillpoint/profile.json.new && "
           "sudo mv /etc/stillpoint/profile.json.new /etc/stillpoint/profile.json && "
           "sudo systemctl restart stillpoint-serve", stdin=json.dumps(entry))


def test_first_boot_configured_the_appliance_from_guestinfo(appliance: Appliance) -> None:
    journal = _ok(appliance, "sudo journalctl -b -u stillpoint-firstboot --no-pager -o cat")
    assert "login checked" in journal and "repository ready" in journal, journal
    assert _ok(appliance, "systemctl is-active stillpoint-serve").strip() == "active"
    profile = json.loads(_ok(appliance, "sudo cat /etc/stillpoint/profile.json"))
    assert profile["vcenter"]["thumbprint_sha256"] == appliance.lab.vcsim.thumbprint_sha256
    assert appliance.password not in json.dumps(profile)   # in a 0600 file beside it
    assert _ok(appliance, "sudo stat -c '%U %a' /etc/stillpoint/vcenter.password").split() == [
        "stillpoint", "600"]
    repo = profile["repository"]["path"]
    assert repo.startswith(REPOSITORY_MOUNT + "/"), repo
    assert _ok(appliance, f"sudo stat -c %U {repo}").strip() == "stillpoint"


def test_a_vcenter_scheduled_job_backs_up_the_guest_from_the_appliance(
        appliance: Appliance, record_property: Any) -> None:
    a = appliance
    _add_guest_access(a)
    _ok(a, f"sudo stillpoint job create nightly --vm {GUEST} --daily 01:30 "
           "--keep-daily 7 --app-aware require")
    jobs = json.loads(_ok(a, "sudo stillpoint job list --json"))
    [job] = [j for j in jobs if j["name"] == "nightly"]
    assert job.get("next_run"), job          # vCenter scheduled it
    # vCenter's "Run" fires the scheduled task; the appliance's serve runs the backup.
    t0 = time.monotonic()
    rc, out, err = _run(a, "sudo stillpoint job run nightly --wait 1800", timeout=2000)
    took = time.monotonic() - t0
    record_property("scheduled_backup_s", round(took))
    serve_log = _run(a, "sudo journalctl -u stillpoint-serve --no-pager -o cat | tail -60")[1]
    assert rc == 0, out + err + serve_log
    shown = json.loads(_ok(a, "sudo stillpoint job show nightly --json"))
    print(json.dumps(shown, indent=1))
    points = json.loads(_ok(a, "sudo stillpoint list --json"))
    [point] = [p for p in points if p["vm"] == GUEST]
    assert point["consistency"] == "application", point
    check = _ok(a, "sudo stillpoint check --read-data", timeout=1800)
    assert "no problems found (all data re-read)" in check, check
    # The appliance took the agent out of the guest again, and its snapshot.
    guest = a.lab.guests[GUEST]
    assert guest.sh("ls -d /opt/stillpoint 2>/dev/null").stdout.strip() == ""
    # No password in the appliance's logs or job history.
    logs = _run(a, "sudo journalctl -b --no-pager -o cat; sudo cat /var/log/stillpoint/* "
                   "2>/dev/null", timeout=300)[1]
    assert a.password not in logs
