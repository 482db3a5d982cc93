"""Scheduled tasks in the lab's vCenter simulator (tests/lab/vcsim/scheduler.go), through pyVmomi.

Every test runs against two simulators (module fixture parameters): "scratch", a small binary
built here from scheduler.go and a generated main (the stock VPX inventory: DC0, hosts,
DC0_H0_VM0 …) served over TLS with a self-signed certificate made here; and "lab", the lab's
real stillpoint-vcsim started through stillpoint_lab.vcsim. pyVmomi always verifies the
simulator's certificate.

Actions used, and why they are harmless: ``RefreshStorageInfo`` on a VM only re-reads the
VM's file layout from its datastore directory (power state and config untouched);
``RefreshDatastore`` on a datastore only stats its directory; ``SetCustomValue`` with a key
that is not defined fails before changing anything (that is the failing action).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import selectors
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from stillpoint_lab.config import LabConfig
from stillpoint_lab.vcsim import VcsimDisk, VcsimVM, start_vcsim

pytestmark = pytest.mark.lab

SCHEDULER_GO = Path(__file__).parent / "vcsim" / "scheduler.go"
UTC = dt.UTC

# The generated main: the stock VPX model plus our scheduler, TLS from files, any free port.
MAIN_GO = """\
package main

import (
\t"crypto/tls"
\t"fmt"
\t"log"
\t"net/url"
\t"os"
\t"os/signal"
\t"syscall"

\t"github.com/vmware/govmomi/simulator"
\t"github.com/vmware/govmomi/vim25/methods"
\t"github.com/vmware/govmomi/vim25/soap"
\t"github.com/vmware/govmomi/vim25/types"
)

// routeProbe stands in for the lab's side objects (same moref value, own type): scheduled
// ResetGuestInformation actions on VMs are routed to it through scheduledActionRoute.
type routeProbe struct{ Self types.ManagedObjectReference }

func (p *routeProbe) Reference() types.ManagedObjectReference { return p.Self }

func (p *routeProbe) ResetGuestInformation(req *types.ResetGuestInformation) soap.HasFault {
\tbody := &methods.ResetGuestInformationBody{}
\tif req.This != p.Self {
\t\tbody.Fault_ = simulator.Fault("", &types.InvalidArgument{InvalidProperty: "_this"})
\t\treturn body
\t}
\tbody.Res = &types.ResetGuestInformationResponse{}
\treturn body
}

func main() {
\tmodel := simulator.VPX()
\tif err := model.Create(); err != nil {
\t\tlog.Fatal(err)
\t}
\tinstallScheduledTaskManager(model)
\tfor _, vm := range simulator.Map.All("VirtualMachine") {
\t\tsimulator.Map.Put(&routeProbe{Self: types.ManagedObjectReference{
\t\t\tType: "SchedRouteProbe", Value: vm.Reference().Value}})
\t}
\tscheduledActionRoute = func(obj types.ManagedObjectReference, method string) types.ManagedObjectReference {
\t\tif obj.Type == "VirtualMachine" && method == "ResetGuestInformation" {
\t\t\treturn types.ManagedObjectReference{Type: "SchedRouteProbe", Value: obj.Value}
\t\t}
\t\treturn obj
\t}
\tcert, err := tls.LoadX509KeyPair(os.Args[1], os.Args[2])
\tif err != nil {
\t\tlog.Fatal(err)
\t}
\tmodel.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
\tmodel.Service.Listen = &url.URL{Host: "127.0.0.1:0"}
\ts := model.Service.NewServer()
\tfmt.Printf("PORT=%s\\n", s.URL.Port())
\tsig := make(chan os.Signal, 1)
\tsignal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
\t<-sig
\ts.Close()
\tmodel.Remove()
}
"""


def _make_cert(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stillpoint-vcsim")])
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def _build(directory: Path) -> Path:
    src = directory / "src"
    src.mkdir()
    (src / "main.go").write_text(MAIN_GO)
    shutil.copy(SCHEDULER_GO, src / "scheduler.go")
    binary = directory / "stillpoint-vcsim"
    env = dict(os.environ, GOPATH="/usr/share/gocode", GO111MODULE="off")
    subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=src,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return binary


def _read_port(proc: subprocess.Popen[bytes], timeout: float) -> int:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline().decode()
            if line.startswith("PORT="):
                return int(line.strip().split("=", 1)[1])
            if not line:
                break
    raise RuntimeError(f"simulator did not start (exit code {proc.poll()})")


@contextlib.contextmanager
def _scratch_simulator(directory: Path) -> Iterator[vim.ServiceInstance]:
    """scheduler.go alone, on the stock VPX inventory."""
    binary = _build(directory)
    cert, key = _make_cert(directory)
    with open(directory / "stderr.log", "wb") as errlog:
        proc = subprocess.Popen(
            [str(binary), str(cert), str(key)], stdout=subprocess.PIPE, stderr=errlog
        )
    try:
        port = _read_port(proc, timeout=30)
        context = ssl.create_default_context(cafile=str(cert))
        # The simulator's default login; not a secret.
        conn = SmartConnect(
            host="127.0.0.1", port=port, user="user", pwd="pass", sslContext=context
        )
        try:
            yield conn
        finally:
            Disconnect(conn)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _lab_simulator(directory: Path) -> Iterator[vim.ServiceInstance]:
    """The lab's real stillpoint-vcsim (tests/lab/vcsim, main.go installs the scheduler)."""
    small = (VcsimDisk(16 << 20),)
    vms = [VcsimVM("sched-vm1", disks=small), VcsimVM("sched-vm2", disks=small)]
    handle = start_vcsim(LabConfig(), directory, vms)
    try:
        conn = SmartConnect(
            host=handle.host,
            port=handle.port,
            user=handle.user,
            pwd=handle.password,
            sslContext=handle.ssl_context(),
        )
        try:
            yield conn
        finally:
            Disconnect(conn)
    finally:
        handle.stop()


@pytest.fixture(scope="module", params=["scratch", "lab"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def si(flavor: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[vim.ServiceInstance]:
    directory = tmp_path_factory.mktemp(f"vcsim-sched-{flavor}")
    start = _scratch_simulator if flavor == "scratch" else _lab_simulator
    with start(directory) as conn:
        yield conn


# ---- helpers -------------------------------------------------------------------------


def _first(si: vim.ServiceInstance, kind: type, skip: int = 0) -> Any:
    content = si.RetrieveContent()
    assert content.viewManager is not None
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return sorted(view.view, key=lambda o: o.name)[skip]
    finally:
        view.DestroyView()


def _spec(
    name: str,
    scheduler: vim.scheduler.TaskScheduler,
    method: Any = vim.VirtualMachine.RefreshStorageInfo,
    args: tuple[Any, ...] = (),
    enabled: bool = True,
) -> vim.scheduler.ScheduledTaskSpec:
    # MethodAction.name is a vmodl method (pyVmomi sends its wsdl name).
    action = vim.action.MethodAction(
        name=method, argument=[vim.action.MethodActionArgument(value=a) for a in args]
    )
    return vim.scheduler.ScheduledTaskSpec(
        name=name,
        description="stillpoint test",
        enabled=enabled,
        scheduler=scheduler,
        action=action,
    )


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


class _Follow:
    """info.* of one scheduled task through WaitForUpdatesEx; opened before the run is
    triggered so that transient values (state running, activeTask) are seen."""

    PATHS: ClassVar[list[str]] = [
        "info.state",
        "info.prevRunTime",
        "info.activeTask",
        "info.nextRunTime",
    ]

    def __init__(self, si: vim.ServiceInstance, task: vim.scheduler.ScheduledTask) -> None:
        self.si, self.task = si, task
        self.props: dict[str, Any] = {}
        self.seen: list[dict[str, Any]] = []
        self.version = ""

    def __enter__(self) -> Self:
        pc = self.si.RetrieveContent().propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=self.task)],
            propSet=[
                vmodl.query.PropertyCollector.PropertySpec(
                    type=vim.scheduler.ScheduledTask, pathSet=self.PATHS
                )
            ],
        )
        self.collector = pc.CreatePropertyCollector()
        try:
            self.collector.CreateFilter(spec, partialUpdates=False)
            # The first call returns the current state; only from then on does the
            # simulator queue changes for this collector.
            self._poll()
        except BaseException:
            self.collector.DestroyPropertyCollector()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.collector.DestroyPropertyCollector()  # destroys its filter too

    def until(self, done: Callable[[dict[str, Any]], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.props):
                return
            self._poll()
        if done(self.props):
            return
        raise AssertionError(f"scheduled task did not reach the expected state: {self.props}")

    def _poll(self) -> None:
        result = self.collector.WaitForUpdatesEx(
            self.version, vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=1)
        )
        if result is None:
            return
        self.version = result.version
        for fs in result.filterSet:
            for ou in fs.objectSet:
                changes = {c.name: c.val for c in ou.changeSet}
                self.seen.append(changes)
                self.props.update(changes)

    def finished(self, timeout: float = 20) -> None:
        """Wait for a completed run (a final state with prevRunTime set)."""
        self.until(
            lambda p: (
                p.get("info.state") in ("success", "error")
                and p.get("info.prevRunTime") is not None
            ),
            timeout,
        )

    def active_tasks(self) -> list[vim.Task]:
        return [c["info.activeTask"] for c in self.seen if c.get("info.activeTask") is not None]


def _events(
    si: vim.ServiceInstance, entity: vim.ManagedEntity, task: vim.scheduler.ScheduledTask
) -> list[Any]:
    """Scheduled-task events of entity for task, oldest first, through an EventHistoryCollector."""
    em = si.RetrieveContent().eventManager
    assert em is not None
    spec = vim.event.EventFilterSpec(
        entity=vim.event.EventFilterSpec.ByEntity(entity=entity, recursion="self"),
        eventTypeId=[
            "ScheduledTaskCreatedEvent",
            "ScheduledTaskStartedEvent",
            "ScheduledTaskCompletedEvent",
            "ScheduledTaskFailedEvent",
            "ScheduledTaskReconfiguredEvent",
            "ScheduledTaskRemovedEvent",
        ],
        # A page as large as the simulator's history: with a smaller page the 0.24.2
        # simulator fills it with the newest event followed by the oldest ones.
        maxCount=1000,
    )
    collector = em.CreateCollectorForEvents(spec)
    try:
        page = list(collector.latestPage)
    finally:
        collector.DestroyCollector()
    ours = [e for e in page if e.scheduledTask.scheduledTask == task]
    return sorted(ours, key=lambda e: e.key)


def _kinds(events: list[Any]) -> list[str]:
    return [type(e).__name__.rsplit(".", 1)[-1] for e in events]


def _stm(si: vim.ServiceInstance) -> vim.scheduler.ScheduledTaskManager:
    stm = si.RetrieveContent().scheduledTaskManager
    assert stm is not None
    return stm


# ---- tests ---------------------------------------------------------------------------


def test_once_task_runs_on_time_and_posts_events(si: vim.ServiceInstance) -> None:
    vm = _first(si, vim.VirtualMachine)
    power, change_version = vm.runtime.powerState, vm.config.changeVersion
    run_at = _now() + dt.timedelta(seconds=3)
    task = _stm(si).CreateScheduledTask(
        vm, _spec("once-refresh", vim.scheduler.OnceTaskScheduler(runAt=run_at))
    )
    info = task.info
    assert info.state == "queued" and info.prevRunTime is None
    assert abs((info.nextRunTime - run_at).total_seconds()) < 0.01
    assert info.entity == vm and info.taskObject == vm and info.scheduledTask == task

    with _Follow(si, task) as follow:
        follow.finished()
    info = task.info
    assert info.state == "success", info.error
    assert info.prevRunTime >= run_at - dt.timedelta(seconds=0.01)
    assert info.prevRunTime < run_at + dt.timedelta(seconds=5)
    assert info.nextRunTime is None and info.activeTask is None

    # The run had a real Task, reported while running, with the scheduler as its reason.
    active = follow.active_tasks()
    assert any(c.get("info.state") == "running" for c in follow.seen)
    assert active, follow.seen
    run = active[0].info
    assert run.state == "success" and run.entity == vm
    assert isinstance(run.reason, vim.TaskReasonSchedule) and run.reason.scheduledTask == task

    events = _events(si, vm, task)
    assert _kinds(events) == [
        "ScheduledTaskCreatedEvent",
        "ScheduledTaskStartedEvent",
        "ScheduledTaskCompletedEvent",
    ]
    for event in events:
        assert event.entity.entity == vm and event.entity.name == vm.name
        assert event.scheduledTask.name == "once-refresh" and event.vm.vm == vm
    # Harmless: the VM is as it was.
    assert vm.runtime.powerState == power and vm.config.changeVersion == change_version
    task.RemoveScheduledTask()


def test_retrieve_finds_tasks_by_entity_and_object(si: vim.ServiceInstance) -> None:
    stm = _stm(si)
    vm, other = _first(si, vim.VirtualMachine), _first(si, vim.VirtualMachine, skip=1)
    ds = _first(si, vim.Datastore)
    later = vim.scheduler.OnceTaskScheduler(runAt=_now() + dt.timedelta(hours=1))
    on_vm = stm.CreateScheduledTask(vm, _spec("find-vm", later))
    on_ds = stm.CreateObjectScheduledTask(ds, _spec("find-ds", later, method=vim.Datastore.Refresh))
    try:
        assert on_vm in stm.RetrieveEntityScheduledTask(vm)
        assert on_vm not in stm.RetrieveEntityScheduledTask(other)
        assert on_ds in stm.RetrieveObjectScheduledTask(ds)
        assert on_ds not in stm.RetrieveObjectScheduledTask(vm)
        everything = stm.RetrieveEntityScheduledTask(None)
        assert on_vm in everything and on_ds in everything
        assert on_vm in stm.scheduledTask and on_ds in stm.scheduledTask
        assert len(stm.description.dayOfWeek) == 7
        with pytest.raises(vim.fault.DuplicateName):
            stm.CreateScheduledTask(other, _spec("find-vm", later))
    finally:
        on_vm.RemoveScheduledTask()
        on_ds.RemoveScheduledTask()


def test_reconfigure_moves_next_run_time(si: vim.ServiceInstance) -> None:
    vm = _first(si, vim.VirtualMachine)
    first = (_now() + dt.timedelta(hours=1)).replace(microsecond=0)
    task = _stm(si).CreateScheduledTask(
        vm, _spec("reconfigure-me", vim.scheduler.OnceTaskScheduler(runAt=first))
    )
    try:
        assert task.info.nextRunTime == first
        moved = first + dt.timedelta(hours=5)
        task.ReconfigureScheduledTask(
            _spec("reconfigured", vim.scheduler.OnceTaskScheduler(runAt=moved), enabled=False)
        )
        info = task.info
        assert info.nextRunTime == moved and info.name == "reconfigured" and not info.enabled
        daily = vim.scheduler.DailyTaskScheduler(hour=(first.hour + 2) % 24, minute=7)
        task.ReconfigureScheduledTask(_spec("reconfigured", daily))
        assert task.info.nextRunTime == _expected_daily(_now(), daily.hour, 7)
        assert _kinds(_events(si, vm, task)) == [
            "ScheduledTaskCreatedEvent",
            "ScheduledTaskReconfiguredEvent",
            "ScheduledTaskReconfiguredEvent",
        ]
        with pytest.raises(vmodl.fault.InvalidArgument):
            task.ReconfigureScheduledTask(
                _spec("reconfigured", vim.scheduler.DailyTaskScheduler(hour=24, minute=0))
            )
    finally:
        task.RemoveScheduledTask()


def _expected_daily(now: dt.datetime, hour: int, minute: int) -> dt.datetime:
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return at if at > now else at + dt.timedelta(days=1)


def _between(
    make: Callable[[], vim.scheduler.ScheduledTask],
    expected: Callable[[dt.datetime], dt.datetime | None],
) -> tuple[Any, set[Any]]:
    """Create a task and return its nextRunTime with the values expected from the clock just
    before and just after creation (they differ only if a boundary passed in between)."""
    before = _now()
    task = make()
    after = _now()
    try:
        return task.info.nextRunTime, {expected(before), expected(after)}
    finally:
        task.RemoveScheduledTask()


def test_recurrent_next_run_times(si: vim.ServiceInstance) -> None:
    stm = _stm(si)
    vm = _first(si, vim.VirtualMachine)

    def make(name: str, sched: vim.scheduler.TaskScheduler) -> Callable[[], Any]:
        return lambda: stm.CreateScheduledTask(vm, _spec(name, sched, enabled=False))

    def hourly(now: dt.datetime) -> dt.datetime:
        at = now.replace(minute=41, second=0, microsecond=0)
        return at if at > now else at + dt.timedelta(hours=1)

    got, want = _between(
        make("hourly", vim.scheduler.HourlyTaskScheduler(minute=41, interval=1)), hourly
    )
    assert got in want

    got, want = _between(
        make("daily", vim.scheduler.DailyTaskScheduler(hour=3, minute=15)),
        lambda now: _expected_daily(now, 3, 15),
    )
    assert got in want

    # Weekly on one weekday, three days from today: that day at 22:30 UTC.
    def weekly(now: dt.datetime) -> dt.datetime:
        return (now + dt.timedelta(days=3)).replace(hour=22, minute=30, second=0, microsecond=0)

    target = (_now() + dt.timedelta(days=3)).strftime("%A").lower()
    got, want = _between(
        make("weekly", vim.scheduler.WeeklyTaskScheduler(hour=22, minute=30, **{target: True})),
        weekly,
    )
    assert got in want

    # activeTime defers the first run; expireTime before any run leaves none.
    active = (_now() + dt.timedelta(days=10)).replace(hour=12, minute=0, second=0, microsecond=0)
    sched = vim.scheduler.DailyTaskScheduler(hour=6, minute=0, interval=2, activeTime=active)
    got, want = _between(
        make("daily-active", sched), lambda _n: active.replace(hour=6) + dt.timedelta(days=1)
    )
    assert got in want
    sched = vim.scheduler.DailyTaskScheduler(
        hour=6, minute=0, activeTime=active, expireTime=active + dt.timedelta(hours=1)
    )
    got, want = _between(make("daily-expired", sched), lambda _n: None)
    assert got in want

    with pytest.raises(vmodl.fault.InvalidArgument):
        stm.CreateScheduledTask(
            vm, _spec("no-days", vim.scheduler.WeeklyTaskScheduler(hour=1, minute=0))
        )

    # After startup: the simulator started within this test module, minutes ago.
    task = make("after-startup", vim.scheduler.AfterStartupTaskScheduler(minute=600))()
    try:
        started = task.info.nextRunTime - dt.timedelta(minutes=600)
        assert _now() - dt.timedelta(minutes=30) < started <= _now()
    finally:
        task.RemoveScheduledTask()
    got, want = _between(
        make("after-startup-passed", vim.scheduler.AfterStartupTaskScheduler(minute=0)),
        lambda _n: None,
    )
    assert got in want


def test_disabled_task_skips_its_turn(si: vim.ServiceInstance) -> None:
    vm = _first(si, vim.VirtualMachine)
    run_at = _now() + dt.timedelta(seconds=1)
    task = _stm(si).CreateScheduledTask(
        vm, _spec("disabled", vim.scheduler.OnceTaskScheduler(runAt=run_at), enabled=False)
    )
    try:
        with _Follow(si, task) as follow:
            follow.until(lambda p: "info.nextRunTime" in p and p["info.nextRunTime"] is None)
        info = task.info
        assert info.state == "queued" and info.prevRunTime is None and info.activeTask is None
        assert _kinds(_events(si, vm, task)) == ["ScheduledTaskCreatedEvent"]
    finally:
        task.RemoveScheduledTask()


def test_run_now_keeps_schedule(si: vim.ServiceInstance) -> None:
    vm = _first(si, vim.VirtualMachine, skip=1)
    task = _stm(si).CreateScheduledTask(
        vm, _spec("run-now", vim.scheduler.DailyTaskScheduler(hour=4, minute=0))
    )
    try:
        next_run = task.info.nextRunTime
        with _Follow(si, task) as follow:
            task.RunScheduledTask()
            follow.finished()
        info = task.info
        assert info.state == "success", info.error
        assert info.nextRunTime == next_run
        assert _kinds(_events(si, vm, task))[-2:] == [
            "ScheduledTaskStartedEvent",
            "ScheduledTaskCompletedEvent",
        ]
    finally:
        task.RemoveScheduledTask()


def test_object_task_without_run_at_runs_at_once(si: vim.ServiceInstance) -> None:
    ds = _first(si, vim.Datastore)
    # OnceTaskScheduler without runAt: run as soon as created.
    task = _stm(si).CreateObjectScheduledTask(
        ds, _spec("refresh-ds", vim.scheduler.OnceTaskScheduler(), method=vim.Datastore.Refresh)
    )
    try:
        with _Follow(si, task) as follow:
            follow.finished()
        assert task.info.state == "success", task.info.error
        assert _kinds(_events(si, ds, task))[-1] == "ScheduledTaskCompletedEvent"
    finally:
        task.RemoveScheduledTask()


def test_remove_deletes_the_task(si: vim.ServiceInstance) -> None:
    stm = _stm(si)
    vm = _first(si, vim.VirtualMachine)
    task = stm.CreateScheduledTask(
        vm,
        _spec("remove-me", vim.scheduler.OnceTaskScheduler(runAt=_now() + dt.timedelta(hours=1))),
    )
    task.RemoveScheduledTask()
    assert task not in stm.scheduledTask
    assert task not in stm.RetrieveEntityScheduledTask(vm)
    with pytest.raises(vmodl.fault.ManagedObjectNotFound):
        _ = task.info
    assert _kinds(_events(si, vm, task)) == [
        "ScheduledTaskCreatedEvent",
        "ScheduledTaskRemovedEvent",
    ]


def test_async_method_task_becomes_active_task(si: vim.ServiceInstance) -> None:
    host = _first(si, vim.HostSystem)
    assert not host.runtime.inMaintenanceMode  # so exiting it changes nothing
    task = _stm(si).CreateScheduledTask(
        host,
        _spec(
            "exit-mm",
            vim.scheduler.OnceTaskScheduler(runAt=_now() + dt.timedelta(hours=1)),
            method=vim.HostSystem.ExitMaintenanceMode,
            args=(0,),
        ),
    )  # timeout argument (xsd:long)
    try:
        with _Follow(si, task) as follow:
            task.RunScheduledTask()
            follow.finished()
        assert task.info.state == "success", task.info.error
        active = follow.active_tasks()
        assert active, follow.seen
        run = active[0].info
        assert run.descriptionId == "HostSystem.exitMaintenanceMode" and run.state == "success"
        assert isinstance(run.reason, vim.TaskReasonSchedule) and run.reason.scheduledTask == task
        assert not host.runtime.inMaintenanceMode
        assert _kinds(_events(si, host, task))[-1] == "ScheduledTaskCompletedEvent"
    finally:
        task.RemoveScheduledTask()


@pytest.mark.parametrize(
    ("method", "args", "fault"),
    [
        # Fails on the unknown key before anything is set.
        (
            vim.ExtensibleManagedObject.SetCustomValue,
            ("stillpoint-no-such-field", "x"),
            vmodl.fault.InvalidArgument,
        ),
        # Not implemented by the simulator: the run must fail cleanly.
        (vim.VirtualMachine.AcquireMksTicket, (), vmodl.fault.MethodNotFound),
        # An asynchronous method whose Task fails: the VM is already powered on.
        (vim.VirtualMachine.PowerOn, (), vim.fault.InvalidPowerState),
    ],
    ids=["bad-argument", "not-implemented", "task-fails"],
)
def test_failing_action_posts_failed_event(
    si: vim.ServiceInstance, method: Any, args: tuple[Any, ...], fault: type
) -> None:
    vm = _first(si, vim.VirtualMachine)
    assert vm.runtime.powerState == "poweredOn"
    task = _stm(si).CreateScheduledTask(
        vm,
        _spec(
            f"fail-{method.info.wsdlName}",
            vim.scheduler.OnceTaskScheduler(runAt=_now() + dt.timedelta(seconds=2)),
            method=method,
            args=args,
        ),
    )
    try:
        with _Follow(si, task) as follow:
            follow.finished()
        info = task.info
        assert info.state == "error" and isinstance(info.error, fault)
        events = _events(si, vm, task)
        assert _kinds(events)[-2:] == ["ScheduledTaskStartedEvent", "ScheduledTaskFailedEvent"]
        assert isinstance(events[-1].reason, fault)
    finally:
        task.RemoveScheduledTask()


# The route probe exists only in the scratch main (the lab's main sets its own route).
@pytest.mark.parametrize("flavor", ["scratch"], indirect=True)
def test_action_follows_the_route_hook(si: vim.ServiceInstance) -> None:
    vm = _first(si, vim.VirtualMachine)
    task = _stm(si).CreateScheduledTask(
        vm,
        _spec(
            "routed",
            vim.scheduler.OnceTaskScheduler(runAt=_now() + dt.timedelta(hours=1)),
            # Not implemented by the simulator's VirtualMachine: succeeds only when routed.
            method=vim.VirtualMachine.ResetGuestInformation,
        ),
    )
    try:
        with _Follow(si, task) as follow:
            task.RunScheduledTask()
            follow.finished()
        assert task.info.state == "success", task.info.error
    finally:
        task.RemoveScheduledTask()
