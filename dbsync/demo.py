"""``dbsync demo``: the emulator, the daemon and a synthetic feed, in one command.

It starts the bundled Demandbase emulator and a real daemon on loopback (temporary
state directory, real SQLite, real HTTP), then feeds three audiences the three ways a
CDP can: native NDJSON changes, Adobe Experience Platform profile exports, and a full
CSV snapshot; then removals the same three ways. A fourth audience is fed as a real
AEP customer feeds dbsync: two daily full exports (CSV with Adobe's headers and a
manifest) written into the watched folder, the second dropping a fifth of the first.
Meanwhile the emulator answers a storm of 429s and silently drops 5% of the rows of
completed import jobs; the reconciler (short visibility lag and interval) reads the
lists back, finds the losses and sends them again. A few accounts are unknown to the
tenant on purpose: Demandbase ignores rows that match no account, and the reconciler
sets them aside as unmatched after its repair limit; the report names them instead of
hiding them.

A progress table per audience (pending, in flight, exported, acknowledged, verified,
lost, repaired, rejected, 429s) is printed every 1.5 s: rewritten in place on a
terminal, successive tables otherwise. The run ends when every list (the emulator's
true contents) equals its desired state, nothing is pending or in flight, every
acknowledgment has been judged by a read-back (so every repair was verified), the
expected accounts are set aside as unmatched and every ledger balances; or after the
timeout. Exit 0 only when every list equals its desired state and the rest holds.

The parts (the configuration, the emulator, the daemon in process, the CDP's three
senders) are the test harness's, :mod:`dbsync.testing`: the demo runs what the tests
run, and only its feed, its progress table and its report are its own.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from dbsync import logs
from dbsync.config.schema import FileIngestSettings
from dbsync.demandbase.emulator import EmulatorSettings
from dbsync.model import Account, Backlog, LedgerCheck, RejectReason
from dbsync.testing import (
    AudienceConfig,
    DaemonExited,
    Engine,
    aep_profile,
    list_differences,
    running_daemon,
    running_emulator,
    strangers,
    write_config,
)
from dbsync.testing.aepfiles import epoch, write_export

__all__ = ["run"]

_AUDIENCES = (
    ("demo-emea", "High-intent EMEA accounts", "native NDJSON changes"),
    ("demo-aep", "Open opportunities, North America", "AEP profile exports"),
    ("demo-snapshot", "Expansion targets", "full CSV snapshots"),
    ("demo-files", "Renewals", "AEP file exports"),
)
_AEP_AUDIENCE_ID = "4f8e2b1c-9d3a-4e5f-8a7b-6c5d4e3f2a1b"  # demo-files' UUID in AEP
_STRANGERS = 5  # accounts only the CDP knows, fed to the first audience
_DROP_RATIO = 0.05  # share of completed import rows the emulator silently leaves out
_STORM_429S = 6  # Demandbase requests answered 429 once delivery starts
_DAY_SECONDS = 60.0  # the emulated quota day, on both sides
_VISIBILITY_LAG_SECONDS = 0.5  # the emulator's; the reconciler waits a little longer
_PROGRESS_SECONDS = 1.5


def run(args: argparse.Namespace) -> int:
    import uvloop

    if args.accounts < 10:
        print("dbsync demo: --accounts must be at least 10", file=sys.stderr)
        return 2
    # The tables go to stdout; the daemon's warnings (the 429s it met, the losses its
    # read-backs found) to stderr, as key=value event lines.
    logs.configure("warning", "text", stream=sys.stderr)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_demo(args.accounts, args.seed, args.timeout_seconds))


# The emulated quota day on both sides; fast job polls and read-backs, so that a run
# takes seconds; Demandbase's published limits otherwise (not the harness's "no limits").
_TABLES: dict[str, dict[str, object]] = {
    "destination": {"name": "demo", "description": "the bundled emulator"},
    "daemon": {"drain_seconds": 5.0, "summary_interval_seconds": 5.0},
    "logging": {"level": "warning"},
    "limits": {"day_seconds": _DAY_SECONDS},
    "delivery": {
        "job_poll_initial_seconds": 0.3,
        "job_poll_max_seconds": 1.0,
        "pace_recovery_seconds": 2.0,
    },
    "reconcile": {
        # A little longer than the emulator's lag, so that a read-back sees the import.
        "visibility_lag_seconds": _VISIBILITY_LAG_SECONDS * 2,
        "interval_seconds": 2.0,
        "repair_limit": 3,
        "export_poll_initial_seconds": 0.3,
        "export_poll_max_seconds": 1.0,
    },
}
_CONFIGS = [
    AudienceConfig(
        audience_id,
        name,
        max_records=250,
        max_age_seconds=0.5,
        requests_per_minute=60,
        aep_audience_id=_AEP_AUDIENCE_ID if audience_id == "demo-files" else None,
    )
    for audience_id, name, _ in _AUDIENCES
]


async def _demo(per_audience: int, seed: int, timeout_seconds: float) -> int:
    rng = random.Random(seed)
    started = time.monotonic()
    settings = EmulatorSettings(
        accounts=max(10_000, per_audience * 5),
        seed=seed,
        job_delay_seconds=0.3,
        day_seconds=_DAY_SECONDS,
        visibility_lag_seconds=_VISIBILITY_LAG_SECONDS,
        drop_ratio=_DROP_RATIO,
    )
    with tempfile.TemporaryDirectory(prefix="dbsync-demo-") as tmp:
        async with running_emulator(settings) as emulator:
            config = write_config(
                Path(tmp),
                emulator.url,
                _CONFIGS,
                token=settings.token,
                presets=False,
                destination=_TABLES["destination"],
                daemon=_TABLES["daemon"],
                logging=_TABLES["logging"],
                limits=_TABLES["limits"],
                delivery=_TABLES["delivery"],
                reconcile=_TABLES["reconcile"],
                ingest={
                    "files": FileIngestSettings(
                        directory=Path(tmp) / "inbox", poll_seconds=0.5, settle_seconds=1.0
                    )
                },
            )
            try:
                async with running_daemon(config, check_exit=False, ready_timeout=60.0) as daemon:
                    engine = Engine(emulator, daemon, _CONFIGS)
                    print(f"emulator  {emulator.url}\ningest    {engine.cdp.url}")
                    desired, known, state = await _run(
                        engine, per_audience, rng, started, timeout_seconds
                    )
            except DaemonExited as exited:
                print("dbsync demo: the daemon did not start", file=sys.stderr)
                return exited.code or 1
        code = _report(desired, known, state)
        outcome = "ok" if code == 0 else "FAILED"
        print(f"dbsync demo: {outcome} in {time.monotonic() - started:.1f} s")
        return code


async def _run(
    engine: Engine, per_audience: int, rng: random.Random, started: float, timeout_seconds: float
) -> tuple[dict[str, set[str]], set[str], _State]:
    """Storm, feed, watch: the desired members, the accounts the tenant knows, the last look."""
    # Four pools, and newcomers for the second snapshot and the second file.
    tenant = await engine.tenant_accounts(per_audience * 4 + 2 * (per_audience // 10))
    storm = {"drop_ratio": _DROP_RATIO, "status_storm": {"status": 429, "count": _STORM_429S}}
    answer = await engine.emulator.set_faults(storm)
    if answer.status != 200:
        raise RuntimeError(f"the emulator refused the faults: {answer.status} {answer.body!r}")
    print(
        f"faults    {_STORM_429S} answers 429, then {_DROP_RATIO:.0%} of"
        " completed rows silently dropped"
    )
    desired = await _feed(engine, tenant, per_audience, rng)
    known = {a.external_id for a in tenant}
    state = await _watch(engine, desired, known, started, timeout_seconds)
    return desired, known, state


async def _feed(
    engine: Engine, tenant: list[Account], per_audience: int, rng: random.Random
) -> dict[str, set[str]]:
    """Send adds then removes, three ways; return the desired members per audience."""
    cdp = engine.cdp
    (emea, _, _), (aep, _, _), (snapshot, _, _), (files, _, _) = _AUDIENCES
    pools = [tenant[i * per_audience : (i + 1) * per_audience] for i in range(4)]
    config = engine.daemon.config
    assert config is not None
    assert config.ingest.files is not None
    inbox = config.ingest.files.directory
    now = time.time()

    def profiles(accounts: list[Account], status: str, ts: float) -> list[dict[str, object]]:
        # Adobe also sends audiences not activated here: ignored and counted.
        statuses = {aep: status, "not-activated-here": "realized"}
        return [aep_profile(a, statuses, qualified_at=ts) for a in accounts]

    # Accounts that exist only in the CDP: Demandbase will ignore them.
    emea_members = [*pools[0], *strangers(_STRANGERS)]
    await cdp.changes([(emea, a, True) for a in emea_members], ts=now)
    await cdp.aep(profiles(pools[1], "realized", now))
    await cdp.snapshot(snapshot, pools[2])

    leaving = rng.sample(pools[0], per_audience // 5)
    await cdp.changes([(emea, a, False) for a in leaving], ts=now + 1)
    exiting = rng.sample(pools[1], per_audience // 5)
    await cdp.aep(profiles(exiting, "exited", now + 1))
    # A fifth at most: more would be held by the removal guard (max_removal_percent).
    kept = rng.sample(pools[2], per_audience - per_audience // 5)
    newcomers = tenant[4 * per_audience : 4 * per_audience + per_audience // 10]
    await cdp.snapshot(snapshot, [*kept, *newcomers])

    # Two daily full exports at once: the watcher applies them oldest first.
    def rows(accounts: list[Account]) -> list[tuple[str, str, str, str | None]]:
        return [(a.external_id, a.name, a.domain, "realized") for a in accounts]

    write_export(inbox, _AEP_AUDIENCE_ID, rows(pools[3]), when=epoch(2026, 12, 1), manifest=True)
    renewing = rng.sample(pools[3], per_audience - per_audience // 5)
    more = tenant[
        4 * per_audience + per_audience // 10 : 4 * per_audience + 2 * (per_audience // 10)
    ]
    write_export(
        inbox, _AEP_AUDIENCE_ID, rows([*renewing, *more]), when=epoch(2026, 12, 2), manifest=True
    )

    return {
        emea: {a.external_id for a in emea_members} - {a.external_id for a in leaving},
        aep: {a.external_id for a in pools[1]} - {a.external_id for a in exiting},
        snapshot: {a.external_id for a in [*kept, *newcomers]},
        files: {a.external_id for a in [*renewing, *more]},
    }


class _State(msgspec.Struct, kw_only=True):
    """What one look at the store and the emulator saw."""

    lists: dict[str, set[str]]
    backlogs: dict[str, Backlog]
    ledgers: dict[str, LedgerCheck]
    done: bool = False


async def _look(engine: Engine, desired: dict[str, set[str]], known: set[str]) -> _State:
    store = engine.store
    by_name = await engine.lists()
    lists = {config.id: by_name.get(config.list, set()) for config in _CONFIGS}
    backlogs = {a: await store.backlog(a) for a, _, _ in _AUDIENCES}
    ledgers = {a: await store.ledger_check(a) for a, _, _ in _AUDIENCES}
    state = _State(lists=lists, backlogs=backlogs, ledgers=ledgers)
    journal = await store.pending_journal_rows()
    state.done = not journal and all(
        _audience_done(audience_id, desired, known, state) for audience_id, _, _ in _AUDIENCES
    )
    return state


def _audience_done(
    audience_id: str, desired: dict[str, set[str]], known: set[str], state: _State
) -> bool:
    want = desired[audience_id]
    backlog = state.backlogs[audience_id]
    check = state.ledgers[audience_id]
    counts = check.counts
    unmatched = counts.rejected_by_reason.get(RejectReason.UNMATCHED, 0)
    equal = not list_differences(
        {audience_id: want & known}, {audience_id: state.lists[audience_id]}
    )
    return (
        equal
        and backlog.pending == 0
        and backlog.in_flight == 0
        and check.balanced
        and check.awaiting == 0
        and check.processing == 0
        and unmatched == len(want - known)
        and counts.rejected == unmatched
    )


async def _watch(
    engine: Engine,
    desired: dict[str, set[str]],
    known: set[str],
    started: float,
    timeout_seconds: float,
) -> _State:
    """Print progress until the run is done or the timeout passes; the last look."""
    tty = sys.stdout.isatty()
    printed = 0
    deadline = started + timeout_seconds
    while True:
        state = await _look(engine, desired, known)
        lines = _progress(state, time.monotonic() - started)
        if tty and printed:
            sys.stdout.write(f"\x1b[{printed}F\x1b[J")
        sys.stdout.write("\n".join(lines) + "\n" + ("" if tty else "\n"))
        sys.stdout.flush()
        printed = len(lines)
        if state.done or time.monotonic() >= deadline:
            return state
        await asyncio.sleep(_PROGRESS_SECONDS)


def _progress(state: _State, elapsed: float) -> list[str]:
    header = (
        f"{'audience':<16}{'pending':>8}{'in flight':>10}{'exported':>9}{'acked':>7}"
        f"{'verified':>9}{'lost':>6}{'repaired':>9}{'rejected':>9}{'429s':>6}  ledger"
    )
    lines = [f"progress at {elapsed:5.1f} s", header]
    for audience_id, _, _ in _AUDIENCES:
        backlog = state.backlogs[audience_id]
        check = state.ledgers[audience_id]
        c = check.counts
        ledger = "balanced" if check.balanced else f"off {logs.text_value(check.imbalances)}"
        lines.append(
            f"{audience_id:<16}{backlog.pending:>8}{backlog.in_flight:>10}{c.exported:>9}"
            f"{c.acknowledged:>7}{c.verified:>9}{c.lost:>6}{c.repaired:>9}{c.rejected:>9}"
            f"{c.throttled:>6}  {ledger}"
        )
    return lines


def _report(desired: dict[str, set[str]], known: set[str], state: _State) -> int:
    ok = state.done
    print()
    print(
        f"{'audience':<16}{'fed by':<24}{'desired':>8}{'in list':>9}{'unmatched':>11}"
        f"{'lost':>6}{'repaired':>9}  verdict"
    )
    lost = repaired = throttled = 0
    for audience_id, _, fed_by in _AUDIENCES:
        want = desired[audience_id]
        members = state.lists[audience_id]
        unmatched = want - known
        counts = state.ledgers[audience_id].counts
        lost += counts.lost
        repaired += counts.repaired
        throttled += counts.throttled
        equal = members == want & known
        done = _audience_done(audience_id, desired, known, state)
        if not equal:
            verdict = f"DIFFERS ({len(members ^ (want & known))} accounts)"
        elif not done:
            verdict = "equal, NOT SETTLED"
        else:
            verdict = "matches"
        print(
            f"{audience_id:<16}{fed_by:<24}{len(want):>8}{len(members):>9}{len(unmatched):>11}"
            f"{counts.lost:>6}{counts.repaired:>9}  {verdict}"
        )
    print()
    print(
        f"met {throttled} answers 429 while delivering; read-backs found {lost} rows lost"
        f" and sent {repaired} again"
    )
    if not state.done:
        print(
            "not settled before the timeout: something pending or in flight, an"
            " acknowledgment not yet read back, or a ledger that does not balance"
        )
    print(
        "unmatched: accounts the CDP knows but Demandbase's account database does not;"
        " Demandbase ignores them, the reconciler sets them aside after its repair limit"
    )
    return 0 if ok else 1
