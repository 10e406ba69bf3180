"""``dbsync ctl``: talk to a running daemon over its admin socket.

    dbsync ctl [--socket PATH | --config PATH] [--json] [--timeout SECONDS] VERB [AUDIENCE]

The verbs and their arguments are derived from the protocol's request Structs
(:data:`dbsync.admin.protocol.REQUESTS`): a verb added there shows up here. Output is
aligned tables for people, or with ``--json`` the daemon's reply as one JSON document
(a fault included, so that a script always reads one document). Exit codes are
INTERFACES.md's: 0 done; 1 the daemon answered with a fault; 2 usage; 69 no daemon
answers; 75 timed out; 77 permission denied; 78 the configuration is invalid (ours,
when it names the socket, or the one a ``reload`` was asked to apply).

It must start fast: a blocking socket and msgspec, no event loop, nothing of the
daemon (a test holds it to that). The socket is ``--socket``, else the one the
configuration names; reading the configuration is cheap (no secret is read).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import assert_never

import msgspec

from dbsync.admin.protocol import (
    DEFAULT_TIMEOUT_SECONDS,
    REQUESTS,
    AdoptReply,
    AnyReply,
    AnyRequest,
    ApproveReply,
    AudienceView,
    DestinationView,
    DiscardReply,
    DrainReply,
    Fault,
    FaultCode,
    FilesReply,
    FlushReply,
    LastBatchView,
    PauseReply,
    QuotaReply,
    ReconcileReply,
    ReconcileView,
    RejectedReply,
    ReloadReply,
    RequeueReply,
    ResumeReply,
    ResyncReply,
    StatusReply,
)
from dbsync.exitcodes import ExitCode
from dbsync.logs import text_value

__all__ = ["add_arguments", "render", "run"]


# --- the command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``ctl``'s options and one sub-command per verb of the protocol."""
    _add_options(parser, argparse.SUPPRESS)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for request in REQUESTS:
        verb = str(request.__struct_config__.tag)
        summary = (request.__doc__ or "").strip().splitlines()[0]
        sub = verbs.add_parser(verb, help=summary, description=summary)
        fields = request.__struct_fields__
        if "audience" in fields:
            required = "audience" not in _optional_fields(request)
            sub.add_argument(
                "audience", metavar="AUDIENCE", nargs=None if required else "?", default=None
            )
        if "limit" in fields:
            sub.add_argument("--limit", type=int, help="show at most this many")
        # The options are accepted after the verb too: `dbsync ctl status --json`.
        _add_options(sub, argparse.SUPPRESS)
        sub.set_defaults(request_type=request)


def _add_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--socket", default=default, help="the admin socket (default: config's)")
    parser.add_argument(
        "--config",
        default=default,
        help=(
            "config naming the socket (default: $DBSYNC_CONFIG, else"
            " /etc/dbsync/config.toml if it exists, else ./config.toml)"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", default=default, help="print the reply as JSON"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help=f"wait at most this long for the effect ({DEFAULT_TIMEOUT_SECONDS:g})",
    )


def _optional_fields(request: type) -> set[str]:
    import msgspec.inspect as mi

    info = mi.type_info(request)
    assert isinstance(info, mi.StructType)
    return {f.name for f in info.fields if not f.required}


def run(args: argparse.Namespace, *, config_path: Path) -> int:
    """The ``dbsync ctl`` entry point; ``config_path`` is the default chain's answer."""
    from dbsync.admin.client import exchange

    as_json = bool(getattr(args, "json", False))
    request = _request(args)
    if isinstance(request, Fault):
        return _fail(request, as_json)
    socket = getattr(args, "socket", None)
    if socket is None:
        path = Path(args.config) if getattr(args, "config", None) else config_path
        found = _socket_of(path)
        if isinstance(found, Fault):
            return _fail(found, as_json)
        socket = found
    reply = exchange(Path(socket), request)
    if isinstance(reply, Fault):
        return _fail(reply, as_json)
    print(msgspec.json.encode(reply).decode() if as_json else render(reply))
    return ExitCode.OK


def _request(args: argparse.Namespace) -> AnyRequest | Fault:
    keys: dict[str, object] = {"verb": args.request_type.__struct_config__.tag}
    for name in ("audience", "limit"):
        if getattr(args, name, None) is not None:
            keys[name] = getattr(args, name)
    if getattr(args, "timeout", None) is not None:
        keys["timeout_seconds"] = args.timeout
    try:
        request: AnyRequest = msgspec.convert(keys, AnyRequest)  # the daemon's checks, here
        return request
    except msgspec.ValidationError as exc:
        return Fault(code=FaultCode.BAD_REQUEST, message=str(exc))


def _socket_of(config_path: Path) -> str | Fault:
    from dbsync.config import load_config
    from dbsync.errors import ConfigError

    try:
        return str(load_config(config_path).daemon.admin_socket)
    except ConfigError as exc:
        return Fault(
            code=FaultCode.CONFIG_INVALID,
            message=f"invalid configuration {config_path}: {exc} (or give --socket)",
        )


def _fail(fault: Fault, as_json: bool) -> int:
    if as_json:
        print(msgspec.json.encode(fault).decode())
    print(f"dbsync ctl: {fault.message} [{fault.code}]", file=sys.stderr)
    return fault.code.exit_code


# --- human output --------------------------------------------------------------------------


def render(reply: AnyReply) -> str:
    """A reply as people read it: a sentence, or aligned tables."""
    match reply:
        case StatusReply():
            return _status(reply)
        case PauseReply(audience=audience, state=state, waited_seconds=waited):
            return f"{audience}: {state} (after {waited:g} s; until resume or restart)"
        case ResumeReply(audience=audience, state=state, waited_seconds=waited):
            return f"{audience}: {state} (after {waited:g} s)"
        case FlushReply():
            return (
                f"{reply.audience}: flushed; pending {reply.pending_before} -> {reply.pending},"
                f" {reply.in_flight} accounts in flight"
            )
        case ResyncReply(audience=audience, accounts=accounts, paused=paused):
            line = f"{audience}: {accounts} desired members will be sent again"
            return line + (" once resumed (the audience is paused)" if paused else "")
        case RequeueReply(audience=audience, accounts=accounts):
            return f"{audience}: {accounts} rejected accounts put back in the queue"
        case RejectedReply():
            return _rejected(reply)
        case QuotaReply(destinations=destinations):
            return _destinations(destinations)
        case ReconcileReply(report=report):
            return _report(report)
        case AdoptReply(adopted=adopted, report=report):
            return (
                f"{report.audience_id}: {adopted} members already in list {report.list_id}"
                " taken as delivered; only the difference is sent\n" + _report(report)
            )
        case ReloadReply(audiences=audiences):
            return f"configuration reloaded: {len(audiences)} audiences active"
        case DrainReply(drain_seconds=seconds):
            return f"draining: the daemon finishes its jobs in flight (at most {seconds:g} s)"
        case FilesReply():
            return _files(reply)
        case ApproveReply(audience=audience, added=added, removed=removed):
            return f"{audience}: held snapshot applied: {added} accounts added, {removed} removed"
        case DiscardReply(audience=audience, members=members, removed=removed):
            return (
                f"{audience}: held snapshot of {members} members dropped"
                f" (it would have removed {removed}); desired state unchanged"
            )
        case Fault():
            return f"{reply.code}: {reply.message}"
        case _:
            assert_never(reply)


def _status(reply: StatusReply) -> str:
    d = reply.daemon
    head = (
        f"dbsync {d.version}  pid {d.pid}  up {_duration(d.uptime_seconds)}  config {d.config}"
        + ("  DRAINING" if d.draining else "")
    )
    parts = [
        head,
        _audiences(reply.audiences),
        _ledgers(reply.audiences),
        _reconciles(reply.audiences),
    ]
    reasons = [f"{a.audience}: {a.state}: {_safe(a.reason)}" for a in reply.audiences if a.reason]
    if reasons:
        parts.append("\n".join(reasons))
    held = [
        f"{a.audience}: snapshot HELD ({a.held_snapshot.source}, {a.held_snapshot.members}"
        f" members): {_safe(a.held_snapshot.reason)}; dbsync ctl approve|discard {a.audience}"
        for a in reply.audiences
        if a.held_snapshot is not None
    ]
    if held:
        parts.append("\n".join(held))
    for audience in reply.audiences:
        if audience.open_batches:
            parts.append(
                _table(
                    ["BATCH", "ACTION", "STATE", "ROWS", "JOB", "AGE"],
                    [
                        [b.batch_id, b.action, b.state, b.rows, b.job_id, _duration(b.age_seconds)]
                        for b in audience.open_batches
                    ],
                )
            )
    parts.append(_destinations(reply.destinations))
    return "\n\n".join(p for p in parts if p)


def _audiences(audiences: Sequence[AudienceView]) -> str:
    if not audiences:
        return "no audiences"
    return _table(
        [
            "AUDIENCE",
            "STATE",
            "PENDING",
            "INS/DEL",
            "OLDEST",
            "IN FLIGHT",
            "JOBS",
            "REJECTED",
            "PACE/MIN",
            "LAST BATCH",
            "LIST",
        ],
        [
            [
                a.audience,
                a.state,
                a.pending_inserts + a.pending_deletes,
                f"{a.pending_inserts}/{a.pending_deletes}",
                _duration(a.oldest_pending_age_seconds),
                a.in_flight,
                a.jobs_in_flight,
                a.rejected,
                a.pace_per_minute,
                _last_batch(a.last_batch),
                f"{a.destination}:{a.list_name}",
            ]
            for a in audiences
        ],
    )


def _last_batch(batch: LastBatchView | None) -> str | None:
    if batch is None:
        return None
    return f"{batch.state} {batch.action} {batch.rows} {_timestamp(batch.finished_at)}"


def _ledgers(audiences: Sequence[AudienceView]) -> str:
    """The counters as a table; their breakdowns by cause, where any, as lines after it."""
    counters: list[str] = []
    for audience in audiences:
        counters += [
            c for c, v in audience.ledger.items() if isinstance(v, int) and c not in counters
        ]
    if not counters:
        return ""
    table = _table(
        ["LEDGER", *(c.upper() for c in counters), "BALANCED"],
        [
            [a.audience, *(a.ledger.get(c, 0) for c in counters), _yes(a.ledger_balanced)]
            for a in audiences
        ],
    )
    breakdowns = [
        f"{a.audience} {name}: " + ", ".join(f"{k} {n}" for k, n in sorted(value.items()))
        for a in audiences
        for name, value in a.ledger.items()
        if isinstance(value, dict) and value
    ]
    return "\n".join([table, *breakdowns])


def _reconciles(audiences: Sequence[AudienceView]) -> str:
    """When each list was last read back, what it found, and when the next read-back is."""
    rows = []
    for a in audiences:
        last = a.last_reconcile
        rows.append(
            [
                a.audience,
                _timestamp(last.finished_at) if last else None,
                last.verified if last else None,
                last.lost_total if last else None,
                last.repaired if last else None,
                len(last.unmatched) if last else None,
                last.too_young if last else None,
                _timestamp(a.next_reconcile_at) if a.next_reconcile_at is not None else None,
            ]
        )
    return _table(
        ["READ BACK", "LAST", "VERIFIED", "LOST", "REPAIRED", "UNMATCHED", "TOO YOUNG", "NEXT"],
        rows,
    )


def _report(r: ReconcileView) -> str:
    """``reconcile``'s answer: the numbers, then every account set aside, by name."""
    lines = [
        f"{r.audience_id}: list {r.list_id} read back ({r.listed} accounts listed),"
        f" export job {r.export_job_id}, {_timestamp(r.started_at)} to"
        f" {_timestamp(r.finished_at)}",
        f"judged {r.expected} members acknowledged before {_timestamp(r.judged_before)}:"
        f" {r.verified} verified, {r.lost_total} lost, {r.repaired} sent again",
        f"not judged: {r.too_young} within the visibility lag, {r.unsettled} pending or in flight",
        f"listed but not desired: {r.extra_removed}, being removed",
    ]
    if r.extra_kept:
        lines.append(
            f"listed but not desired, with no External Account ID: {r.extra_kept}, left"
            " (no delete row can name them; remove them in Demandbase if they should go)"
        )
    if r.lost:
        lines.append("lost by cause: " + ", ".join(f"{k} {n}" for k, n in sorted(r.lost.items())))
    lines.append(
        "ledger balanced" if r.ledger_balanced else f"LEDGER IMBALANCE: {text_value(r.imbalances)}"
    )
    set_aside = (
        ("unmatched: Demandbase has no account that matches them", r.unmatched),
        ("not removable: still listed after every repair", r.not_removable),
    )
    for reason, accounts in set_aside:
        if accounts:
            lines.append(f"\nset aside as {reason}")
            lines.append(
                _table(
                    ["EXTERNAL ID", "DOMAIN", "NAME"],
                    [[a.external_id, a.domain, a.name] for a in accounts],
                )
            )
    return "\n".join(lines)


def _destinations(destinations: Sequence[DestinationView]) -> str:
    if not destinations:
        return "no destinations"
    summary = _table(
        [
            "DESTINATION",
            "AUTH",
            "AUTH STATE",
            "PACE/MIN",
            "JOBS",
            "THROTTLED",
            "QUOTA DAY ENDS",
            "CONTRACT",
            "PROBED",
        ],
        [
            [
                d.destination,
                d.auth_mode,
                d.auth_state,
                d.pace_per_minute,
                f"{d.jobs_in_flight}/{d.job_slots}",
                d.throttled,
                _timestamp(d.window_ends_at),
                d.contract,
                _timestamp(d.probed_at) if d.probed_at is not None else "never",
            ]
            for d in destinations
        ],
    )
    quota = _table(
        ["DESTINATION", "ENDPOINT", "USED", "LEFT", "ALLOWED", "LIMIT"],
        [
            [d.destination, q.endpoint, q.used, q.left, q.allowed, q.limit]
            for d in destinations
            for q in d.quota
        ],
    )
    losses = _table(
        ["LOSSES", "SINCE", "JUDGED", "LOST", "PER 1000", "THROTTLED: PER 1000", "ELSE: PER 1000"],
        [
            [
                d.destination,
                _timestamp(e.since) if e.since > 0 else "first run",
                e.overall.judged,
                e.overall.lost,
                e.overall.lost_per_thousand,
                e.throttled.lost_per_thousand,
                e.unthrottled.lost_per_thousand,
            ]
            for d in destinations
            if (e := d.loss_estimate) is not None
        ],
    )
    has_losses = any(d.loss_estimate is not None for d in destinations)
    return f"{summary}\n\n{quota}" + (f"\n\n{losses}" if has_losses else "")


def _files(reply: FilesReply) -> str:
    if reply.directory is None:
        return "no watched folder: set [ingest.files] in the configuration"
    parts = [f"watching {reply.directory}"]
    if reply.held:
        parts.append(
            "held by the removal guard (dbsync ctl approve|discard AUDIENCE):\n"
            + _table(
                ["AUDIENCE", "SOURCE", "RECEIVED", "MEMBERS", "NOW", "WOULD REMOVE", "REASON"],
                [
                    [
                        h.audience,
                        h.source,
                        _timestamp(h.received_at),
                        h.members,
                        h.current,
                        h.removed,
                        h.reason,
                    ]
                    for h in reply.held
                ],
            )
        )
    if reply.waiting:
        parts.append(
            "waiting:\n"
            + _table(
                ["AUDIENCE", "RUN", "FILES", "SINCE", "REASON"],
                [
                    [w.audience, w.run, len(w.files), _timestamp(w.since), w.reason]
                    for w in reply.waiting
                ],
            )
        )
    if reply.runs:
        parts.append(
            _table(
                [
                    "AUDIENCE",
                    "RUN",
                    "OUTCOME",
                    "FILES",
                    "ROWS",
                    "ADDED",
                    "REMOVED",
                    "LEFT OUT",
                    "DECIDED",
                    "REASON",
                ],
                [
                    [
                        r.audience,
                        r.run,
                        r.outcome,
                        len(r.files),
                        r.rows,
                        r.added,
                        r.removed,
                        r.invalid,
                        _timestamp(r.decided_at),
                        r.reason,
                    ]
                    for r in reply.runs
                ],
            )
        )
    else:
        parts.append("no runs decided yet")
    return "\n\n".join(parts)


def _rejected(reply: RejectedReply) -> str:
    if not reply.accounts:
        return "no rejected accounts"
    table = _table(
        [
            "AUDIENCE",
            "EXTERNAL ID",
            "ACTION",
            "DOMAIN",
            "ATTEMPTS",
            "REJECTED AT",
            "NEXT RETRY",
            "REASON",
        ],
        [
            [
                r.audience,
                r.external_id,
                "insert" if r.member else "delete",
                r.domain,
                r.attempts,
                _timestamp(r.rejected_at),
                "now (sent again)"
                if r.retrying
                else (_timestamp(r.next_retry_at) if r.next_retry_at is not None else "never"),
                r.reason,
            ]
            for r in reply.accounts
        ],
    )
    if reply.total > len(reply.accounts):
        table += f"\n({len(reply.accounts)} of {reply.total}; --limit shows more, --json all)"
    return table


# --- cells -----------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[_cell(value) for value in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def _cell(value: object) -> str:
    match value:
        case None:
            return "-"
        case bool():
            return _yes(value)
        case float() if value.is_integer():
            return str(int(value))
        case float():
            return f"{value:.1f}"
        case str():
            return _safe(value)
    return text_value(value)


# A reason may quote an exception or Demandbase's own text: one line, no control
# characters (a terminal would obey them), and not so long that it buries the table.
_REASON_MAX_CHARS = 300


def _safe(text: str) -> str:
    printable = "".join(c if c.isprintable() else " " for c in text)
    line = " ".join(printable.split())
    return line if len(line) <= _REASON_MAX_CHARS else line[: _REASON_MAX_CHARS - 1] + "…"


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))
