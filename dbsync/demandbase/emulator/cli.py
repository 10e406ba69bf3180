"""``dbsync emulator``: the Demandbase emulator as a process.

:func:`add_arguments` is called at every ``dbsync`` start to build the parser, so this
module imports only light parts of the standard library at module level; asyncio,
uvloop and the emulator itself are imported by :func:`run`. Each flag maps to one
:class:`~dbsync.demandbase.emulator.settings.EmulatorSettings` field (:data:`_FLAGS`);
values are checked by the settings' own constraints, and a bad one exits 2 with a
message naming the flag.

:func:`run` serves on uvloop until SIGINT or SIGTERM, logs ``emulator_listening`` with
the URL as one JSON line on stdout once bound, and returns 0 after a clean stop (1,
after an ``emulator_bind_failed`` event, when the address is taken).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbsync.demandbase.emulator.settings import EmulatorSettings

__all__ = ["add_arguments", "run"]

_log = logging.getLogger(__name__)

_DEFAULT_HOST = "127.0.0.1"
_DEFAULT_PORT = 8471  # INTERFACES.md

# (flag, settings field, type, help); the default shown is the settings' own, and a
# unit test holds the two together.
_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--accounts", "accounts", int, "companies in the generated account database (10000)"),
    ("--seed", "seed", int, "seed of the account database and of every fault draw (0)"),
    (
        "--day-seconds",
        "day_seconds",
        float,
        "length of a quota day; days start at the epoch, so 86400 resets at 00:00 UTC (86400)",
    ),
    ("--minute-seconds", "minute_seconds", float, "length of a rate-limit minute (60)"),
    ("--job-delay-seconds", "job_delay_seconds", float, "how long a job processes (2)"),
    (
        "--visibility-lag-seconds",
        "visibility_lag_seconds",
        float,
        "age a list change needs before exports show it (0)",
    ),
    ("--token", "token", str, "the legacy API token (emulator-token)"),
    ("--client-id", "client_id", str, "the API Key Set's client id (emulator-client)"),
    ("--client-secret", "client_secret", str, "the API Key Set's secret (emulator-secret)"),
    ("--token-ttl-seconds", "token_ttl_seconds", int, "lifetime of minted tokens (28800)"),
    ("--requests-per-minute", "requests_per_minute", int, "per-minute request rate (1000)"),
    (
        "--import-concurrency",
        "concurrent_import_jobs",
        int,
        "import jobs processing at once before uploads answer 429-102 (10)",
    ),
    ("--drop-ratio", "drop_ratio", float, "share of matched rows silently dropped (0)"),
)
_FAULT_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--job-fail-ratio", "job_fail_ratio", float, "share of jobs that end failed (0)"),
    ("--error-ratio", "error_ratio", float, "share of requests answered --error-status (0)"),
    ("--error-status", "error_status", int, "the 5xx status of --error-ratio (500)"),
    ("--reset-ratio", "reset_ratio", float, "share of connections dropped unanswered (0)"),
    ("--latency-ms", "latency_ms", float, "delay before every Demandbase answer (0)"),
)
_QUOTA = re.compile(r"^(?P<endpoint>[a-z_.]+)=(?P<limit>\d+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dbsync emulator`` flags (INTERFACES.md), with more for tests and demos."""
    parser.add_argument(
        "--host", default=_DEFAULT_HOST, help=f"address to listen on ({_DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=_DEFAULT_PORT,
        help=f"port; 0 picks a free one ({_DEFAULT_PORT})",
    )
    for flag, field, kind, text in _FLAGS + _FAULT_FLAGS:
        parser.add_argument(
            flag, dest=field, type=kind, default=None, help=text, metavar=_metavar(field, kind)
        )
    parser.add_argument(
        "--quota",
        action="append",
        default=[],
        metavar="ENDPOINT=N",
        help="a daily quota, e.g. export.create_job=5 (repeatable; default Demandbase's)",
    )
    parser.add_argument(
        "--dialect",
        action="append",
        default=[],
        metavar="NAME",
        help="another reading of what Demandbase leaves undocumented (repeatable):"
        " list-per-job, no-list-id, results-need-bearer, results-columns, results-url-null,"
        " states-upper, state-unknown, skip-silently, content-fails, sparse-jobs,"
        " multi-list-column; none: the emulator's own reading",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="debug adds one event per finished job and per refused token (info)",
    )


def _metavar(field: str, kind: type) -> str:
    for suffix in ("seconds", "ratio", "ms"):
        if field.endswith(f"_{suffix}"):
            return suffix.upper()
    return "N" if kind is int else "TEXT"


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return int(text)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM: 0 on a clean stop, 1 if the address is taken, 2: bad flag."""
    import asyncio

    import uvloop

    from dbsync import logs
    from dbsync.exitcodes import ExitCode

    try:
        settings = _settings(args)
    except _BadFlag as bad:
        print(f"dbsync emulator: error: argument {bad.flag}: {bad.reason}", file=sys.stderr)
        return ExitCode.USAGE
    logs.configure(level=args.log_level)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(settings, args.host, args.port))


class _BadFlag(Exception):
    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


def _settings(args: argparse.Namespace) -> EmulatorSettings:
    """The settings the flags ask for; :class:`_BadFlag` names the first flag in error."""
    import msgspec

    from dbsync import validation
    from dbsync.demandbase.emulator.settings import EmulatorSettings

    flag_of = {field: flag for flag, field, _, _ in _FLAGS + _FAULT_FLAGS}
    values: dict[str, Any] = {
        field: getattr(args, field) for _, field, _, _ in _FLAGS if getattr(args, field) is not None
    }
    faults = {
        field: getattr(args, field)
        for _, field, _, _ in _FAULT_FLAGS
        if getattr(args, field) is not None
    }
    if args.dialect:
        faults["dialects"] = list(args.dialect)
        flag_of["dialects"] = "--dialect"
    if faults:
        values["faults"] = faults
    quota_fields = {e.value: f for e, f in EmulatorSettings.daily_quota_fields().items()}
    for quota in args.quota:
        match = _QUOTA.match(quota)
        if match is None or match["endpoint"] not in quota_fields:
            raise _BadFlag(
                "--quota", f"{quota!r} is not ENDPOINT=N, ENDPOINT one of {sorted(quota_fields)}"
            )
        field = quota_fields[match["endpoint"]]
        values[field] = int(match["limit"])
        flag_of[field] = "--quota"
    try:
        return msgspec.convert(values, EmulatorSettings)
    except msgspec.ValidationError as exc:
        message, path = validation.split(exc)
        flag = flag_of.get(path.removeprefix("faults.").split(".")[0].split("[")[0], "(settings)")
        raise _BadFlag(flag, message) from None


async def _serve(settings: EmulatorSettings, host: str, port: int) -> int:
    import asyncio

    from dbsync.demandbase.emulator.app import Emulator
    from dbsync.exitcodes import ExitCode

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    emulator = Emulator(settings)
    try:
        async with emulator.serve(host, port):
            await stop.wait()
    except OSError as exc:
        _log.error(
            "emulator_bind_failed",
            extra={"host": host, "port": port, "error": exc.strerror or str(exc)},
        )
        return ExitCode.FAULT
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return ExitCode.OK
