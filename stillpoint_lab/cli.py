"""`stillpoint-lab up|status|down`: the test and demo environment (not part of the appliance)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from appliance.cli import run_click
from stillpoint_lab.config import default_config, lab_id_from_env


@click.group(help="The lab: a vCenter simulator and real Linux guests (root only).")
def lab() -> None:
    pass


@lab.command("up", help="Start the simulator and N Linux guests (or the VMs a lab file "
             "describes); write the lab profile.")
@click.option("--vms", type=click.IntRange(0, 8),
              help="Linux guests to boot (0: the simulator and lab-win1 only).  [default: 1]")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="A lab file (TOML, [[vm]] tables: names, folders, disks in bytes or with "
                   "units; docs/lab.md).")
def lab_up_command(vms: int | None, config_file: Path | None) -> None:
    from stillpoint_lab.lab import lab_up

    if config_file is not None and vms is not None:
        raise click.UsageError("give --vms or --config, not both")
    if config_file is not None:
        from stillpoint_lab.lab_file import load_lab_file

        cfg = load_lab_file(config_file, lab_id_from_env())
    else:
        cfg = default_config(vms=1 if vms is None else vms)
    handle = lab_up(cfg, say=click.echo)
    click.echo(f"export STILLPOINT_PROFILE={handle.profile_path}")


@lab.command("status", help="Show whether the lab is up, and where its profile is.")
def lab_status_command() -> None:
    from stillpoint_lab.lab import lab_status

    click.echo(json.dumps(lab_status(default_config()), indent=2))


@lab.command("down", help="Stop the lab and remove everything it created.")
def lab_down_command() -> None:
    from stillpoint_lab.lab import lab_down

    lab_down(default_config(), say=click.echo)


def main(argv: list[str] | None = None) -> None:
    run_click(lab, argv, "stillpoint-lab")


if __name__ == "__main__":
    main()
