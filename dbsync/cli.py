"""The ``dbsync`` command: argparse entry points, one sub-command per verb.

Each sub-command's module is imported only when it runs, so ``dbsync ctl`` and
``dbsync check-config`` start fast and need no event loop.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dbsync import __version__
from dbsync.exitcodes import ExitCode

__all__ = ["default_config_path", "main"]

Handler = Callable[[argparse.Namespace], int]


def default_config_path() -> Path:
    """``$DBSYNC_CONFIG``, else ``/etc/dbsync/config.toml`` if it exists, else ``./config.toml``."""
    env = os.environ.get("DBSYNC_CONFIG")
    if env:
        return Path(env)
    system = Path("/etc/dbsync/config.toml")
    if system.exists():
        return system
    return Path("config.toml")


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else default_config_path()


def _check_config(args: argparse.Namespace) -> int:
    from dbsync.config import check_secrets, load_config
    from dbsync.errors import ConfigError

    path = _config_path(args)
    try:
        config = load_config(path)
        # Secrets too, so that a missing token file shows now rather than at start.
        notes = check_secrets(config)
    except ConfigError as exc:
        print(f"dbsync: invalid configuration {path}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    for note in notes:
        print(f"dbsync: note: {note}", file=sys.stderr)
    audiences = sum(len(d.audiences) for d in config.destinations)
    print(
        f"{path}: ok ({len(config.destinations)} destination(s), {audiences} audience(s))",
    )
    return ExitCode.OK


def _run(args: argparse.Namespace) -> int:
    from dbsync.daemon import run

    return run(_config_path(args))


def _ctl(args: argparse.Namespace) -> int:
    from dbsync.admin.ctl import run

    return run(args, config_path=default_config_path())


def _probe(args: argparse.Namespace) -> int:
    from dbsync.contract.command import run

    return run(args, config_path=_config_path(args))


def _demo(args: argparse.Namespace) -> int:
    from dbsync.demo import run

    return run(args)


def _emulator(args: argparse.Namespace) -> int:
    from dbsync.demandbase.emulator.cli import run

    return run(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbsync",
        description="Keep Demandbase account lists equal to CDP account audiences.",
    )
    parser.add_argument("--version", action="version", version=f"dbsync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground (systemd runs this)")
    run.add_argument("--config", help="config file (default: $DBSYNC_CONFIG or ./config.toml)")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--config", help="config file (default: $DBSYNC_CONFIG or ./config.toml)")
    check.set_defaults(handler=_check_config)

    from dbsync.admin.ctl import add_arguments as add_ctl_arguments

    ctl = commands.add_parser(
        "ctl",
        help="talk to a running daemon: status, pause, flush, reload, drain ...",
        description="Talk to a running daemon over its admin socket.",
    )
    add_ctl_arguments(ctl)
    ctl.set_defaults(handler=_ctl)

    probe = commands.add_parser(
        "probe",
        help="check Demandbase's undocumented behaviour (A1-A5) on the configured tenant",
        description="Announce the spend, then (with --yes) probe the tenant and keep the"
        " verdicts. Exit 0: plan printed, or the contract holds well enough to run; 1: A1"
        " is broken, do not run dbsync against this tenant as it is.",
    )
    probe.add_argument("--config", help="config file (default: $DBSYNC_CONFIG or ./config.toml)")
    probe.add_argument("--destination", help="the destination to probe (default: the first)")
    probe.add_argument("--json", action="store_true", help="print one JSON document")
    probe.add_argument(
        "--yes", action="store_true", help="spend what the plan says; without it, only the plan"
    )
    probe.set_defaults(handler=_probe)

    demo = commands.add_parser(
        "demo", help="one command: emulator + daemon + a synthetic feed, then a report"
    )
    demo.add_argument("--accounts", type=int, default=600, help="accounts per audience")
    demo.add_argument("--seed", type=int, default=7, help="seed of the synthetic feed")
    demo.add_argument(
        "--timeout-seconds", type=float, default=120.0, help="give up waiting after this"
    )
    demo.set_defaults(handler=_demo)

    from dbsync.demandbase.emulator.cli import add_arguments as add_emulator_arguments

    emulator = commands.add_parser("emulator", help="run the bundled Demandbase emulator")
    add_emulator_arguments(emulator)
    emulator.set_defaults(handler=_emulator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    return handler(args)
