"""`stillpoint-lab up|status|down`: the test and demo environment (not part of the appliance)."""

from __future__ import annotations

import json

import click

from appliance.cli import run_click
from stillpoint_lab.config import default_config


@click.group(help="The lab: a vCenter simulator and real Linux guests (root only).")
def lab() -> None:
    pass


@lab.command("up", help="Start the simulator and N Linux guests; write the lab profile.")
@click.option("--vms", default=1, show_default=True, type=click.IntRange(0, 8),
              help="Linux guests to boot (0: the simulator and lab-win1 only).")
def lab_up_command(vms: int) -> None:
    from stillpoint_lab.lab import lab_up

    handle = lab_up(default_config(vms=vms), say=click.echo)
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
