"""The `stillpoint` command line.

Commands parse their arguments into typed options and call into `appliance.jobs` ; nothing below this module sees click. Every error is one line on stderr and an exit
code from `appliance.errors` (listed in `stillpoint --help`); a traceback is written to the
debug log only (or shown with STILLPOINT_DEBUG=1).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from appliance import __version__
from appliance.errors import StillpointError

EXIT_CODES_HELP = """\b
Exit codes:
  0 ok            1 error            2 bad input / usage   3 not found
  4 auth failed   5 trust (TLS/SSH)  6 repository          7 vSphere operation
  8 guest/agent   9 data transport  10 storage full       11 lab environment
 12 done, with warnings (degraded: a fallback to crash-consistent, a skipped
    log truncation, a snapshot left behind; the warnings are printed)
 130 interrupted
"""


@click.group(help="Stillpoint: application-consistent backups of vSphere VMs.\n\n"
             + EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="stillpoint")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
              help="Profile file (default: $STILLPOINT_PROFILE or "
                   "~/.config/stillpoint/profile.json).")
@click.pass_context
def cli(ctx: click.Context, profile_path: str | None) -> None:
    ctx.obj = {"profile": profile_path}


def _register_commands() -> None:
    # Imported here so that each command module stays small and owns its own options.
    from appliance.commands import jobs as jobs_commands

    for command in jobs_commands.COMMANDS:
        cli.add_command(command)
    from appliance.commands import backup as backup_commands

    for command in backup_commands.COMMANDS:
        cli.add_command(command)
    from appliance.commands import restore as restore_commands  # adds to the restore group

    for command in restore_commands.COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    try:
        _register_commands()
    except ImportError as err:   # a broken install must not hide commands silently
        click.echo(f"stillpoint: error: the installation is incomplete, cannot load "
                   f"{err.name or 'a module'}: {err}", err=True)
        sys.exit(1)
    run_click(cli, argv, "stillpoint")


def run_click(group: click.Group, argv: list[str] | None, prog: str) -> None:
    """Run a click group with Stillpoint's error contract (also used by stillpoint-lab)."""
    try:
        group.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    except StillpointError as err:
        _log_traceback()
        click.echo(f"{prog}: error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback to users
        log = _log_traceback()
        click.echo(f"{prog}: internal error: {type(err).__name__}: {err} "
                   f"(details in {log})", err=True)
        sys.exit(1)
    sys.exit(0)


def _log_traceback() -> Path:
    log = Path(os.environ.get("STILLPOINT_LOG_DIR", "~/.cache/stillpoint")).expanduser()
    log.mkdir(parents=True, exist_ok=True)
    path = log / "last-error.log"
    path.write_text(traceback.format_exc())
    if os.environ.get("STILLPOINT_DEBUG"):
        traceback.print_exc()
    return path


if __name__ == "__main__":
    main()
