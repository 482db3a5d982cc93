"""Restore commands: `restore vm`, `restore status`, `restore db`, `files ls|get`, `verify`.

`restore vm/status/db` join the `restore` group of commands/backup.py; `files` and `verify`
are top-level (COMMANDS, registered by cli.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from appliance.commands.backup import _pick_disk, _profile, restore_group
from appliance.errors import UsageError
from appliance.progress import Progress


def _network_map(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old or not new:
            raise UsageError(f"--network-map {pair!r}: use OLD=NEW (OLD may be '*')")
        out[old] = new
    return out


def _progress(as_json: bool) -> Progress:
    return Progress("json" if as_json else "auto", stream=sys.stdout if as_json else None)


@restore_group.command("vm", help="Re-create a VM from a restore point (beside the original "
                       "with --name, or replacing it with --overwrite).")
@click.argument("restore_point")
@click.option("--name", help="Name of the new VM (default: the original's).")
@click.option("--folder", help="VM folder inventory path (default: the original's or the "
              "datacenter's).")
@click.option("--pool", help="Resource pool inventory path.")
@click.option("--host", help="Host inventory path.")
@click.option("--datastore", help="Datastore for the disks (default: the original's).")
@click.option("--network-map", "network_map", multiple=True, metavar="OLD=NEW",
              help="Connect NICs on network OLD to NEW ('*' = every network).")
@click.option("--disconnect-nics", is_flag=True, help="NICs not connected at power on.")
@click.option("--power-on", is_flag=True, help="Power on when the disks are in place.")
@click.option("--until", help="Point in time (ISO time, UTC if no zone) or PostgreSQL LSN.")
@click.option("--overwrite", is_flag=True, help="Replace an existing VM of that name "
              "(also a running one).")
@click.option("--keep-identity", is_flag=True, help="Give a new VM the original's BIOS and "
              "instance UUIDs and MAC addresses (replacing in place always keeps them).")
@click.option("--upload", type=click.Choice(["auto", "datastore-http", "nfc"]), default="auto",
              show_default=True, help="How the disks are written: auto = an OVF import lease (NFC) "
              "on vSAN, vVols and PMEM, which have no flat files; a datastore PUT elsewhere.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def restore_vm_command(ctx: click.Context, restore_point: str, name: str | None,
                       folder: str | None, pool: str | None, host: str | None,
                       datastore: str | None, network_map: tuple[str, ...],
                       disconnect_nics: bool, power_on: bool, until: str | None,
                       overwrite: bool, keep_identity: bool, upload: str,
                       as_json: bool) -> None:
    from appliance.jobs import environment
    from appliance.jobs.restore import RestoreVMOptions, run_restore_vm

    if pool and host:
        raise UsageError("give --pool or --host, not both")
    profile = _profile(ctx)
    opts = RestoreVMOptions(restore_point=restore_point, name=name, folder=folder, pool=pool,
                            host=host, datastore=datastore,
                            network_map=_network_map(network_map),
                            disconnect_nics=disconnect_nics, power_on=power_on, until=until,
                            overwrite=overwrite, keep_identity=keep_identity, upload=upload)
    repo = environment.open_repository(profile)
    session = environment.open_vcenter(profile)
    try:
        result = run_restore_vm(opts, repo, session, _progress(as_json))
    finally:
        session.close()
    if as_json:
        click.echo(json.dumps({"result": asdict(result)}, default=str))
        return
    click.echo(f"{result.vm}: restored from {result.restore_point[:12]} as {result.moref}"
               + (f" until {result.until}" if result.until else "")
               + (", powered on" if result.powered_on else "")
               + f", {_disks_said(result.disks)}, {result.seconds:.1f} s")


def _disks_said(disks: list[dict[str, Any]]) -> str:
    verified = sum(1 for d in disks if d.get("verified"))
    if verified == len(disks):
        return f"{len(disks)} disk(s) verified"
    return (f"{len(disks)} disk(s) written, {verified} read back"
            " (an import lease's disks cannot be read back: see docs/restore.md)")


@restore_group.command("status", help="What the post-restore procedures in a restored VM "
                       "reported (read from the guest).")
@click.argument("vm")
@click.option("--source-vm", help="Use this VM's guest access (same image) when the profile "
              "has none for VM.")
@click.option("--wait", "wait_s", type=float, default=0.0, help="Wait up to this many seconds "
              "for the result.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def restore_status_command(ctx: click.Context, vm: str, source_vm: str | None, wait_s: float,
                           as_json: bool) -> None:
    from appliance.errors import StillpointError
    from appliance.jobs import environment
    from appliance.jobs.restore import restore_status, wait_for_status

    # vCenter tells whether an agent is in the VM's image at all (its restore marker):
    # without one nothing will ever report, and waiting would only time out.
    session = None
    try:
        session = environment.open_vcenter(_profile(ctx))
    except StillpointError as err:
        click.echo(f"note: vCenter not reachable ({err}); asking the guest only", err=True)
    try:
        if wait_s > 0:
            status = wait_for_status(lambda: _profile(ctx), vm, wait_s, source_vm,
                                     session=session)
        else:
            status = restore_status(_profile(ctx), vm, source_vm, session)
    finally:
        if session is not None:
            session.close()
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        state = "none (no agent in the image)" if status["state"] == "no-agent" \
            else status["state"]
        click.echo(f"{vm}: post-restore {state}"
                   + ("" if status["ok"] is None else f", {'OK' if status['ok'] else 'FAILED'}"))
        if status["state"] != "done" and status.get("reason"):
            click.echo(f"  {status['reason']}")
        for name, w in sorted(((status.get("result") or {}).get("writers") or {}).items()):
            click.echo(f"  {name}: {'ok' if w.get('ok') else 'FAILED: ' + str(w.get('error'))}")
        if status["log"]:
            click.echo(status["log"].rstrip())
    if status["state"] == "done" and not status["ok"]:
        sys.exit(8)


@restore_group.command("db", help="Dump one database of a restore point from a private "
                       "sandbox (the live VM is not touched).")
@click.argument("restore_point")
@click.option("--writer", "writer_kind", type=click.Choice(["postgresql"]), required=True)
@click.option("--database", required=True)
@click.option("--to-file", "to_file", required=True, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@click.pass_context
def restore_db_command(ctx: click.Context, restore_point: str, writer_kind: str,
                       database: str, to_file: str, force: bool) -> None:
    from appliance.jobs import environment
    from appliance.jobs.restore_db import dump_database

    if Path(to_file).exists() and not force:
        raise UsageError(f"{to_file} exists: choose another path or pass --force")
    repo = environment.open_repository(_profile(ctx))
    done = dump_database(repo, restore_point, writer_kind, database, Path(to_file))
    click.echo(f"{database}: dumped from restore point {done['restore_point'][:12]} to "
               f"{to_file} ({done['bytes']} bytes)")


@click.group("files", help="Browse and extract files of a restore point (read-only).")
def files_group() -> None:
    pass


def _fs_options(f: Any) -> Any:
    f = click.option("--disk", "disk_index", type=int, default=None,
                     help="Disk index (0 = first) or device key: PATH is then relative to "
                     "that disk's file system. Default: PATH as the guest saw it (its "
                     "/etc/fstab says which disk holds it).")(f)
    return click.option("--partition", type=int, default=None,
                        help="Partition number (0 = whole disk; default: the first file "
                        "system found; implies --disk 0 if --disk is not given).")(f)


@contextmanager
def _open_fs(ctx: click.Context, restore_point: str, path: str, disk_index: int | None,
             partition: int | None) -> Iterator[Any]:
    """The file system to read `path` from: the one given, or the guest's view."""
    from appliance.jobs import environment, files
    from appliance.jobs.guest_tree import guest_tree, replayed_filesystems

    if ".." in path.split("/"):      # refused before any disk is restored
        raise files.PathEscapes(f"{path}: '..' is not allowed in a path inside a restore point")
    repo = environment.open_repository(_profile(ctx))
    rp = repo.get(restore_point)
    if disk_index is None and partition is None:
        with guest_tree(repo, rp, path) as tree:
            if len(tree.used) > 1:
                click.echo("(" + "; ".join(tree.used) + ")", err=True)
            yield tree.fs
        return
    key = _pick_disk(rp, disk_index or 0).key
    with files.disk_image(repo, rp, key) as raw, replayed_filesystems(raw) as filesystems:
        yield files.pick_filesystem(filesystems, partition)


@files_group.command("ls", help="List a directory inside a restore point.")
@click.argument("restore_point")
@click.argument("path", default="/")
@_fs_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def files_ls_command(ctx: click.Context, restore_point: str, path: str,
                     disk_index: int | None, partition: int | None, as_json: bool) -> None:
    from appliance.jobs import files

    with _open_fs(ctx, restore_point, path, disk_index, partition) as fs:
        entries = files.list_dir(fs, path)
    if as_json:
        click.echo(json.dumps([asdict(e) for e in entries], indent=2))
        return
    for e in entries:
        click.echo(f"{e.mode} {e.size:>12} {e.mtime} {e.name}"
                   + (f" -> {e.target}" if e.target else ""))


@files_group.command("get", help="Copy a file or directory out of a restore point.")
@click.argument("restore_point")
@click.argument("path")
@_fs_options
@click.option("--to", "dest", default=".", show_default=True,
              type=click.Path(file_okay=False), help="Directory to write into.")
@click.pass_context
def files_get_command(ctx: click.Context, restore_point: str, path: str,
                      disk_index: int | None, partition: int | None, dest: str) -> None:
    from appliance.jobs import files

    with _open_fs(ctx, restore_point, path, disk_index, partition) as fs:
        written = files.extract(fs, path, Path(dest))
    click.echo(f"{path}: {len(written)} file(s) written under {dest}")


@click.command("verify", help="Prove a restore point restores: boot it in an isolated "
               "sandbox, run the post-restore procedures and each application's own check.")
@click.argument("restore_point")
@click.option("--boot", is_flag=True, required=True, help="Boot a sandbox VM (required: the "
              "only verification mode).")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True)
@click.option("--keep", is_flag=True, help="Leave the sandbox VM running (for inspection).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def verify_command(ctx: click.Context, restore_point: str, boot: bool, timeout_s: float,
                   keep: bool, as_json: bool) -> None:
    from appliance.jobs import environment
    from appliance.jobs.verify import VerifyOptions, run_verify

    profile = _profile(ctx)
    repo = environment.open_repository(profile)
    session = environment.open_vcenter(profile)
    try:
        report = run_verify(VerifyOptions(restore_point, timeout_s=timeout_s, keep=keep),
                            lambda: _profile(ctx), repo, session, _progress(as_json))
    finally:
        session.close()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(f"restore point {report['restore_point'][:12]}: "
                   f"{'PASS' if report['ok'] else 'FAIL'}")
        for name, check in sorted(report["checks"].items()):
            click.echo(f"  {name}: {'pass' if check['ok'] else 'FAIL'}: {check['detail']}")
    if not report["ok"]:
        sys.exit(1)


COMMANDS = [files_group, verify_command]
