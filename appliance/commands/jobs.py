"""Scheduled jobs and the service: `stillpoint job create|list|show|edit|delete|run`,
`stillpoint serve`. A job is a vCenter scheduled task (see appliance/jobs/schedule.py)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from appliance.errors import UsageError
from appliance.profile import Profile, load_profile
from appliance.progress import Progress, human_bytes


def _profile(ctx: click.Context) -> Profile:
    return load_profile(ctx.obj.get("profile") if ctx.obj else None)


def _history(path: str | None) -> Any:
    from appliance.jobs.history import History, default_history_path

    return History(Path(path) if path else default_history_path())


def _session(profile: Profile) -> Any:
    from appliance.jobs import environment

    return environment.open_vcenter(profile)


def _schedule_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--daily", metavar="HH:MM", help="Every day at HH:MM (UTC)."),
        click.option("--weekly", metavar="DAYS@HH:MM", help="e.g. mon,thu@02:30 (UTC)."),
        click.option("--hourly", type=click.IntRange(1, 24), metavar="N",
                     help="Every N hours (at --minute)."),
        click.option("--minute", type=click.IntRange(0, 59), default=0, show_default=True,
                     help="Minute of the hour for --hourly."),
        click.option("--once", metavar="TIME", help="Once, at an ISO time or +SECONDS."),
    ]):
        f = opt(f)
    return f


def _keep_options(f: Any) -> Any:
    for what in ("monthly", "weekly", "daily", "last"):
        f = click.option(f"--keep-{what}", type=click.IntRange(0), default=None,
                         help=f"Retention after each run: keep {what} N restore points.")(f)
    return f


def _keep(**kw: int | None) -> dict[str, int] | None:
    keep = {k: v for k, v in kw.items() if v is not None}
    return keep or None


def _schedule(daily: str | None, weekly: str | None, hourly: int | None, minute: int,
              once: str | None) -> Any:
    from appliance.jobs.schedule import parse_schedule

    return parse_schedule(daily=daily, weekly=weekly, hourly=hourly, minute=minute, once=once)


@click.group("job", help="Backup jobs scheduled by vCenter (each is a vCenter scheduled task).")
def job_group() -> None:
    pass


@job_group.command("create", help="Create a job: a scheduled task on the VM or folder it "
                   "protects, with the job's definition in the task's description.")
@click.argument("name")
@click.option("--vm", "vms", multiple=True, help="A VM (name, inventory path or moref).")
@click.option("--folder", "folders", multiple=True, help="Every VM below a folder "
              "(inventory path, e.g. DC0/vm/prod).")
@click.option("--tag", "tags", multiple=True, help="Every VM with a vSphere tag "
              "([category/]name).")
@_schedule_options
@_keep_options
@click.option("--app-aware", type=click.Choice(["auto", "require", "try", "off"]),
              default="auto", show_default=True)
@click.option("--copy-only", is_flag=True, help="Truncate no application logs.")
@click.option("--disabled", is_flag=True, help="Create the task disabled.")
@click.pass_context
def create_command(ctx: click.Context, name: str, vms: tuple[str, ...],
                   folders: tuple[str, ...], tags: tuple[str, ...], daily: str | None,
                   weekly: str | None, hourly: int | None, minute: int, once: str | None,
                   keep_last: int | None, keep_daily: int | None, keep_weekly: int | None,
                   keep_monthly: int | None, app_aware: str, copy_only: bool,
                   disabled: bool) -> None:
    from appliance.jobs.schedule import JobDefinition, create_job

    schedule = _schedule(daily, weekly, hourly, minute, once)
    keep = _keep(last=keep_last, daily=keep_daily, weekly=keep_weekly,
                 monthly=keep_monthly) or {}
    # Targets are checked and normalized against vCenter by create_job.
    defn = JobDefinition(name, vms + tuple(f"folder:{f}" for f in folders)
                         + tuple(f"tag:{t}" for t in tags), keep, app_aware, copy_only)
    with _session(_profile(ctx)) as session:
        job = create_job(session, defn, schedule, vms, folders, tags, enabled=not disabled)
    click.echo(f"job {job.name} created: scheduled task {job.task.moref} on "
               f"{job.task.entity_moref}, {schedule.describe()}, next run "
               f"{_time(job.task.next_run)}")


@job_group.command("list", help="List the jobs vCenter has, with their last run here.")
@click.option("--history", "history_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_command(ctx: click.Context, history_path: str | None, as_json: bool) -> None:
    from appliance.jobs.schedule import list_jobs

    with _session(_profile(ctx)) as session:
        jobs = list_jobs(session)
    history = _history(history_path)
    docs = []
    for job in jobs:
        last = history.runs(job.name, limit=1)
        docs.append(_job_doc(job) | {"last_run": _run_doc(last[0]) if last else None})
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    click.echo(f"{'JOB':<20}{'SCHEDULE':<34}{'NEXT RUN (UTC)':<22}{'LAST RUN':<12}TARGETS")
    for d in docs:
        last = d["last_run"]["status"] if d["last_run"] else "-"
        state = d["schedule"] + ("" if d["enabled"] else " (disabled)")
        targets = ", ".join(d["targets"]) if d["targets"] else f"BROKEN: {d['problem']}"
        click.echo(f"{d['name']:<20}{state:<34}{(d['next_run'] or '-')[:19]:<22}{last:<12}"
                   f"{targets}")


@job_group.command("show", help="A job's schedule and definition (from vCenter) and its "
                   "recent runs (from the job history): per VM outcome, time, bytes, "
                   "consistency.")
@click.argument("name")
@click.option("--runs", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--history", "history_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show_command(ctx: click.Context, name: str, runs: int, history_path: str | None,
                 as_json: bool) -> None:
    from appliance.jobs.schedule import find_job

    with _session(_profile(ctx)) as session:
        job = find_job(session, name)
    doc = _job_doc(job)
    doc["runs"] = [_run_doc(r) for r in _history(history_path).runs(name, limit=runs)]
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"job {doc['name']}: {doc['schedule']}"
               + ("" if doc["enabled"] else " (disabled)"))
    click.echo(f"  vCenter task {doc['task']} on {doc['entity']}, next run "
               f"{doc['next_run'] or '-'}, last fired {doc['prev_run'] or '-'}")
    if doc["problem"]:
        click.echo(f"  BROKEN: {doc['problem']}")
    else:
        click.echo(f"  targets: {', '.join(doc['targets'])}; keep: {doc['keep'] or 'all'}; "
                   f"app-aware: {doc['app_aware']}")
    for r in doc["runs"]:
        click.echo(f"  run {r['id']} fired {r['fired_at'][:19]} ({r['trigger']}): "
                   f"{r['status']}{' - ' + r['message'] if r['message'] else ''}")
        for v in r["vms"]:
            done = (f"{v['consistency']}-consistent, {v['seconds']:.1f} s, read "
                    f"{human_bytes(v['bytes_read'])}, new {human_bytes(v['bytes_new'])}")
            detail = {"ok": done, "warning": f"{done}; {v['error'] or ''}"}.get(
                v["outcome"], v["error"] or "")   # a warning's text is kept in `error`
            click.echo(f"    {v['vm']:<18}{v['outcome']:<9}{detail}")


@job_group.command("edit", help="Change a job's schedule, retention or app-aware mode in "
                   "vCenter (what is not given stays as vCenter has it).")
@click.argument("name")
@_schedule_options
@_keep_options
@click.option("--app-aware", type=click.Choice(["auto", "require", "try", "off"]))
@click.option("--enable/--disable", "enabled", default=None)
@click.pass_context
def edit_command(ctx: click.Context, name: str, daily: str | None, weekly: str | None,
                 hourly: int | None, minute: int, once: str | None, keep_last: int | None,
                 keep_daily: int | None, keep_weekly: int | None, keep_monthly: int | None,
                 app_aware: str | None, enabled: bool | None) -> None:
    from appliance.jobs.schedule import edit_job

    given = [x for x in (daily, weekly, hourly, once) if x is not None]
    schedule = _schedule(daily, weekly, hourly, minute, once) if given else None
    keep = _keep(last=keep_last, daily=keep_daily, weekly=keep_weekly, monthly=keep_monthly)
    if schedule is None and keep is None and app_aware is None and enabled is None:
        raise UsageError("nothing to change: give a schedule, --keep-*, --app-aware or "
                         "--enable/--disable")
    with _session(_profile(ctx)) as session:
        job = edit_job(session, name, schedule=schedule, keep=keep, app_aware=app_aware,
                       enabled=enabled)
    click.echo(f"job {job.name}: {_job_doc(job)['schedule']}, next run "
               f"{_time(job.task.next_run)}")


@job_group.command("delete", help="Delete a job (its scheduled task); restore points stay.")
@click.argument("name")
@click.pass_context
def delete_command(ctx: click.Context, name: str) -> None:
    from appliance.jobs.schedule import delete_job

    with _session(_profile(ctx)) as session:
        delete_job(session, name)
    click.echo(f"job {name} deleted (its restore points stay in the repository)")


@job_group.command("run", help="Run a job now: vCenter's 'Run' on its task, so that "
                   "`stillpoint serve` runs it as any firing.")
@click.argument("name")
@click.option("--wait", "wait_s", type=click.IntRange(0), default=0,
              help="Wait up to N seconds for the run to finish (needs the service's "
                   "history: run this on the appliance).")
@click.option("--history", "history_path", type=click.Path(dir_okay=False))
@click.pass_context
def run_command(ctx: click.Context, name: str, wait_s: int, history_path: str | None) -> None:
    from appliance.jobs.history import FINAL, firing_key
    from appliance.jobs.schedule import fire_job
    from appliance.vsphere.scheduled_tasks import get_task

    with _session(_profile(ctx)) as session:
        job = fire_job(session, name)
        click.echo(f"job {name}: task {job.task.moref} fired")
        if not wait_s:
            return
        deadline = time.monotonic() + wait_s
        fired = None
        while time.monotonic() < deadline:
            task = get_task(session, job.task.moref)
            if task.prev_run is not None and task.prev_run != job.task.prev_run:
                fired = firing_key(task.prev_run)
                break
            time.sleep(0.5)
    history = _history(history_path)
    while fired is not None and time.monotonic() < deadline:
        for r in history.runs(name, limit=20):
            if r.fired_at == fired and r.status in FINAL:
                click.echo(f"job {name}: run {r.id} {r.status}")
                if r.status != "ok":
                    sys.exit(1)
                return
        time.sleep(0.5)
    raise UsageError(f"job {name}: no finished run within {wait_s} s (is `stillpoint serve` "
                     "running?)")


@click.command("serve", help="The appliance service: run jobs when their vCenter scheduled "
               "tasks fire (SIGTERM stops it gracefully).")
@click.option("--max-vms", default=2, show_default=True, type=click.IntRange(1, 64),
              help="VM backups at once, in total.")
@click.option("--per-host", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--per-datastore", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--catch-up", "catch_up_h", default=6.0, show_default=True,
              type=click.FloatRange(0), help="Run a firing missed while down if it is at "
              "most this many hours old.")
@click.option("--poll", "poll_s", default=5, show_default=True, type=click.IntRange(1, 300),
              help="Longest wait for vCenter updates (also the stop latency), seconds.")
@click.option("--history", "history_path", type=click.Path(dir_okay=False),
              help="Job history database (default $STILLPOINT_HISTORY or "
                   "/var/lib/stillpoint/history.sqlite).")
@click.option("--json", "as_json", is_flag=True, help="Log JSON lines on stderr.")
@click.pass_context
def serve_command(ctx: click.Context, max_vms: int, per_host: int, per_datastore: int,
                  catch_up_h: float, poll_s: int, history_path: str | None,
                  as_json: bool) -> None:
    from appliance.jobs.serve import ServeOptions, Service
    from appliance.jobs.serve_limits import LimitSettings

    profile = _profile(ctx)
    history = _history(history_path)
    progress = Progress("json" if as_json else "plain")
    opts = ServeOptions(limits=LimitSettings(max_vms, per_host, per_datastore),
                        catch_up_s=catch_up_h * 3600, poll_s=poll_s)
    service = Service(opts, profile, history, progress)

    def on_signal(signum: int, _frame: Any) -> None:
        progress.event(f"received {signal.Signals(signum).name}: stopping after the running "
                       "VM backups reach a safe point")
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    progress.event(f"stillpoint serve: history {history.path}, limits {max_vms} VMs, "
                   f"{per_host}/host, {per_datastore}/datastore")
    try:
        service.run()
    finally:
        history.close()


def _time(t: Any) -> str:
    return t.isoformat(timespec="seconds") if t is not None else "-"


def _job_doc(job: Any) -> dict[str, Any]:
    t = job.task
    d = job.definition
    return {
        "name": job.name, "task": t.moref, "entity": t.entity_moref, "enabled": t.enabled,
        "action": t.action,
        "schedule": t.schedule.describe() if t.schedule else "a schedule Stillpoint does "
                    "not model (it still runs when it fires)",
        "next_run": _time(t.next_run) if t.next_run else None,
        "prev_run": _time(t.prev_run) if t.prev_run else None,
        "targets": list(d.targets) if d else [], "keep": d.keep if d else {},
        "app_aware": d.app_aware if d else None, "problem": job.problem,
    }


def _run_doc(r: Any) -> dict[str, Any]:
    return {"id": r.id, "fired_at": r.fired_at, "trigger": r.trigger, "status": r.status,
            "job_id": r.job_id, "started": r.started, "finished": r.finished,
            "message": r.message, "retention": r.retention,
            "vms": [v.__dict__ for v in r.vms]}


COMMANDS = [job_group, serve_command]
