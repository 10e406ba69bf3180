"""The ``dbsync probe`` command: plan, ask for ``--yes``, probe, print, keep the result.

Exit codes: 0 the plan was printed (no ``--yes``; nothing was sent), or the probe ran
and found nothing that stops dbsync (contract ``holds``, ``degraded`` or
``incomplete``); 1 the probe ran and found A1 broken (contract ``broken``: dbsync must
not run against the tenant as it is); 2 usage (an unknown ``--destination``); 69
Demandbase could not be reached; 77 it refused the credentials or a permission; 78 the
configuration is invalid.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

import aiohttp
import msgspec

from dbsync.clock import SystemClock
from dbsync.config import Config, check_secrets, load_config, load_credentials
from dbsync.contract.probe import (
    PLAN,
    ContractProbe,
    ProbeAborted,
    SpendCounter,
    make_record,
    probe_list_name,
)
from dbsync.contract.record import ContractRecord, write_record
from dbsync.demandbase.auth import token_source
from dbsync.demandbase.client import DemandbaseClient
from dbsync.demandbase.wire import Endpoint
from dbsync.errors import ConfigError, DemandbaseError, TransientError
from dbsync.exitcodes import ExitCode

__all__ = ["plan_text", "probe_destination", "report_text", "run"]

_WHAT: dict[Endpoint, str] = {
    Endpoint.IMPORT_JOB_LIST: "import job list reads",
    Endpoint.IMPORT_CREATE_JOB: "import jobs created (of 1,200 a day)",
    Endpoint.IMPORT_UPLOAD: "uploads (of 1,200 a day)",
    Endpoint.IMPORT_JOB_STATUS: "import job status reads, at most (of 3,600 a day)",
    Endpoint.EXPORT_CREATE_JOB: "export jobs (of 60 a day)",
    Endpoint.EXPORT_JOB_STATUS: "export status reads, at most (of 300 a day)",
    Endpoint.EXPORT_DOWNLOAD: "results downloads, at most",
}


def plan_text(destination: str, base_url: str, auth_mode: str, list_name: str) -> str:
    lines = [
        f"dbsync probe: destination {destination} at {base_url} ({auth_mode})",
        "It will spend at most:",
        *(f"  {PLAN[e]:>4}  {_WHAT[e]}" for e in PLAN),
        "It will leave in the tenant:",
        f"  the account list {list_name!r} (up to 3 of that name if each job creates"
        " a list), holding no account: its rows name the domain probe.dbsync.invalid,",
        "  which no account has; and its jobs in the import and export job history.",
        "Delete the list in Demandbase once you have read the verdicts.",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace, *, config_path: Path) -> int:
    import asyncio

    import uvloop

    try:
        config = load_config(config_path)
        check_secrets(config)
    except ConfigError as exc:
        print(f"dbsync probe: invalid configuration {config_path}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    names = [d.name for d in config.destinations]
    name = args.destination or (names[0] if names else None)
    if name not in names:
        print(
            f"dbsync probe: no destination {name!r} (configured: {', '.join(names)})",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    assert name is not None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(
            probe_destination(config, name, yes=args.yes, as_json=args.json, out=sys.stdout)
        )


async def probe_destination(
    config: Config,
    name: str,
    *,
    yes: bool,
    as_json: bool,
    out: TextIO | None = None,
    poll_initial_seconds: float = 1.0,
    poll_max_seconds: float = 30.0,
) -> int:
    """Plan, and with ``yes`` probe destination ``name``; the exit code."""
    stream = out if out is not None else sys.stdout
    index = [d.name for d in config.destinations].index(name)
    destination = config.destinations[index]
    credentials = load_credentials(destination, index)
    auth_mode = "legacy API token" if credentials.token is not None else "API key set"
    now = time.time()
    list_name = probe_list_name(now)
    plan = {e.value: n for e, n in PLAN.items()}
    if not yes:
        if as_json:
            _print(
                stream,
                msgspec.json.encode(
                    {"destination": name, "list_name": list_name, "plan": plan, "probed": False}
                ).decode(),
            )
        else:
            _print(stream, plan_text(name, destination.base_url, auth_mode, list_name))
            _print(stream, "Nothing was sent: run again with --yes to probe.")
        return ExitCode.OK
    if not as_json:
        _print(stream, plan_text(name, destination.base_url, auth_mode, list_name))
    counter = SpendCounter()
    timeout = destination.request_timeout_seconds
    async with aiohttp.ClientSession() as session:
        auth = token_source(
            session,
            destination.base_url,
            credentials,
            clock=SystemClock(),
            timeout_seconds=timeout,
        )
        client = DemandbaseClient(
            session, destination.base_url, auth, timeout_seconds=timeout, observer=counter
        )
        probe = ContractProbe(
            client,
            counter,
            list_name=list_name,
            auth_mode=auth_mode,
            poll_initial_seconds=poll_initial_seconds,
            poll_max_seconds=poll_max_seconds,
        )
        try:
            verdicts = await probe.run()
        except ProbeAborted as aborted:
            _print(stream, f"dbsync probe: Demandbase refused the probe: {aborted.error}")
            return ExitCode.NOPERM
        except TransientError as exc:
            _print(stream, f"dbsync probe: Demandbase could not be reached: {exc}")
            return ExitCode.UNAVAILABLE
        except DemandbaseError as exc:
            _print(stream, f"dbsync probe: {exc}")
            return ExitCode.FAULT
    record = make_record(
        name, probed_at=now, list_name=list_name, verdicts=verdicts, counter=counter
    )
    path = write_record(config.daemon.state_dir, record)
    if as_json:
        document = msgspec.to_builtins(record)
        document["plan"] = plan
        document["within_plan"] = counter.within_plan()
        document["record"] = str(path)
        _print(stream, msgspec.json.encode(document).decode())
    else:
        _print(stream, report_text(record, within_plan=counter.within_plan(), path=path))
    return ExitCode.FAULT if record.state == "broken" else ExitCode.OK


def report_text(record: ContractRecord, *, within_plan: bool, path: Path) -> str:
    lines = ["", "Verdicts:"]
    for v in record.verdicts:
        dialect = f"  [emulator dialect: {v.dialect}]" if v.dialect else ""
        lines.append(f"  {v.check:<13} {v.outcome.upper()}: {v.finding}{dialect}")
        lines.append(f"  {'':<13} dbsync: {v.action}")
    lines.append("")
    lines.append("Spent (announced):")
    for endpoint, most in PLAN.items():
        lines.append(f"  {record.spent.get(endpoint.value, 0):>4} ({most:>3})  {_WHAT[endpoint]}")
    lines.append(f"Within the plan: {'yes' if within_plan else 'NO'}")
    lines.append(f"Contract: {record.state}; kept in {path} (dbsync ctl status shows it)")
    return "\n".join(lines)


def _print(stream: TextIO, text: str) -> None:
    print(text, file=stream, flush=True)
