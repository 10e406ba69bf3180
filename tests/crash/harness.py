"""What the kill -9 scenarios share: a daemon subprocess, a CDP that keeps count, the store's eye.

The emulator runs inside the test process and outlives every daemon it serves; the
daemon is a real ``python -m dbsync run`` that the test kills with SIGKILL and starts
again on the same state directory and the same ingest port, as systemd would.

The test is the CDP, and the only judge of what was *accepted*: a request counts once
ingest answered 202, and then for ever. A request that got no answer because the
daemon died under it is neither accepted nor refused; the CDP sends it again after the
restart, before anything else, so that "last write wins" still means the order in
which the CDP sent its changes. :class:`DesiredState` replays the accepted requests to
give the lists Demandbase must end up with.

:func:`read_store` opens the daemon's SQLite file read-only (also while a daemon runs,
or right after one was killed) and reconstructs the desired state it holds: folded
membership, then the journal rows not folded yet, in sequence order, which is what the
daemon would make of them.

Those two (the subprocess and the SQLite oracle) are this folder's own, independent of
the code they judge on purpose. The rest comes from the shared harness,
:mod:`dbsync.testing`: the configuration writer, the tenant far from any limit, the
NDJSON encoder, waiting for a condition, the verdict "lists equal desired".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from dbsync import testing
from dbsync.config.schema import FileIngestSettings
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.emulator import Emulator, EmulatorSettings, Faults
from dbsync.model import Account
from dbsync.testing import AudienceConfig, changes_ndjson, fast_tenant, list_differences

# (audience id, list name): the three audiences every scenario feeds.
AUDIENCES: tuple[tuple[str, str], ...] = (
    ("crash-emea", "Crash EMEA"),
    ("crash-na", "Crash North America"),
    ("crash-expansion", "Crash expansion targets"),
)
DATABASE = "dbsync.sqlite3"
DRAIN_SECONDS = 5.0
# How long a graceful stop may take beyond drain_seconds: interpreter exit, store close.
STOP_MARGIN_SECONDS = 10.0
HEALTH_TIMEOUT_SECONDS = 30.0

BASE_FAULTS = Faults(latency_ms=5.0)


def emulator_settings(faults: Faults = BASE_FAULTS) -> EmulatorSettings:
    """A tenant whose jobs take long enough to be in flight when a kill comes.

    Its quotas are far above what a scenario spends (:func:`dbsync.testing.fast_tenant`):
    the scenarios are about crashes, not budgets, and quota use persists across
    restarts. Jobs of a killed daemon keep processing while the next one starts its own.
    """
    return fast_tenant(accounts=1_000, seed=7, job_delay_seconds=0.15, faults=faults)


def tenant_accounts(emulator: Emulator, count: int) -> list[Account]:
    """The first ``count`` accounts of the tenant: every row will match, none is ignored."""
    return list(emulator.tenant.accounts.page(0, count))


def free_port() -> int:
    """A TCP port free now on loopback, kept by every daemon of a scenario."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_config(
    path: Path,
    *,
    base_url: str,
    token: str,
    ingest_port: int,
    max_records: int = 20,
    max_age_seconds: float = 0.1,
    files: Path | None = None,
    aep_audience_ids: dict[str, str] | None = None,
) -> None:
    """The daemon's config.toml at ``path``: state beside it, small fast batches, one
    ingest port for every daemon of a scenario, warnings only."""
    written = testing.write_config(
        path.parent,
        base_url,
        [
            AudienceConfig(
                audience_id,
                name=list_name,
                list_name=list_name,
                max_records=max_records,
                max_age_seconds=max_age_seconds,
                # The guard off: the scenarios send random snapshots, and are about kills.
                max_removal_percent=100,
                aep_audience_id=(aep_audience_ids or {}).get(audience_id),
            )
            for audience_id, list_name in AUDIENCES
        ],
        token=token,
        daemon={"drain_seconds": DRAIN_SECONDS},
        ingest={
            "port": ingest_port,
            **({"files": FileIngestSettings(directory=files, poll_seconds=0.1)} if files else {}),
        },
        logging={"level": "warning", "format": "json"},
        limits={"concurrent_import_jobs": 10},
        delivery={"max_jobs_in_flight_per_audience": 3},
    )
    assert written == path, f"the harness writes config.toml, not {path.name}"


# --- the daemon process ------------------------------------------------------------------


class DaemonProcess:
    """``python -m dbsync run`` started, killed and restarted on one config and state.

    Each run writes its stdout and stderr to ``daemon-<n>.log`` beside the config;
    :meth:`logs` gives them back for a failure message.
    """

    def __init__(self, config: Path) -> None:
        self.config = config
        self.database = config.parent / "state" / DATABASE
        self.runs = 0
        self.kills = 0
        self._process: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        assert not self.running, "one daemon at a time on one state directory"
        self.runs += 1
        with (self.config.parent / f"daemon-{self.runs}.log").open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "dbsync",
                "run",
                "--config",
                str(self.config),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config.parent,
            )

    async def wait_healthy(self, session: aiohttp.ClientSession, ingest: str) -> None:
        """Until ``GET /v1/health`` answers 200; fails if the daemon dies or takes too long."""
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self.running, f"the daemon exited during start\n{self.logs()}"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{ingest}/v1/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no healthy daemon after {HEALTH_TIMEOUT_SECONDS} s\n{self.logs()}")

    async def kill9(self) -> None:
        """SIGKILL, then reap: the process gets no chance to finish anything."""
        process = self._process
        assert process is not None
        assert process.returncode is None, self.logs()
        os.kill(process.pid, signal.SIGKILL)
        returncode = await process.wait()
        self.kills += 1
        assert returncode == -signal.SIGKILL, f"exit {returncode}\n{self.logs()}"

    async def kill9_while_draining(self, pause_seconds: float) -> bool:
        """SIGTERM, then SIGKILL after ``pause_seconds`` of drain; False if it exited first."""
        process = self._process
        assert process is not None
        assert process.returncode is None, self.logs()
        process.send_signal(signal.SIGTERM)
        try:
            returncode = await asyncio.wait_for(asyncio.shield(process.wait()), pause_seconds)
        except TimeoutError:
            pass
        else:
            assert returncode == 0, f"exit {returncode} after SIGTERM\n{self.logs()}"
            return False
        # The drain may end at the very moment the pause does: before the signal (the
        # process is reaped already) or between the check and the signal (it exits 0).
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
        returncode = await process.wait()
        if returncode == 0:
            return False
        self.kills += 1
        assert returncode == -signal.SIGKILL, f"exit {returncode}\n{self.logs()}"
        return True

    async def terminate(self) -> int:
        """SIGTERM (graceful drain); the exit code. Fails if the daemon is still running
        well past its drain deadline (a hang, not a slow machine: the margin is wide)."""
        process = self._process
        assert process is not None
        assert process.returncode is None, self.logs()
        process.send_signal(signal.SIGTERM)
        try:
            returncode = await asyncio.wait_for(process.wait(), DRAIN_SECONDS + STOP_MARGIN_SECONDS)
        except TimeoutError:
            raise AssertionError(
                f"no exit within {DRAIN_SECONDS + STOP_MARGIN_SECONDS} s of SIGTERM\n{self.logs()}"
            ) from None
        return returncode

    async def close(self) -> None:
        """Kill and reap whatever still runs: no zombie outlives a test."""
        process = self._process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    def logs(self, tail_lines: int = 40) -> str:
        parts = []
        for run in range(1, self.runs + 1):
            path = self.config.parent / f"daemon-{run}.log"
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            parts.append(f"--- daemon run {run} ({len(lines)} lines) ---")
            parts.extend(lines[-tail_lines:])
        return "\n".join(parts)


@contextlib.asynccontextmanager
async def daemon_process(config: Path) -> AsyncIterator[DaemonProcess]:
    daemon = DaemonProcess(config)
    try:
        yield daemon
    finally:
        await daemon.close()


# --- the CDP's requests and what they mean -------------------------------------------------


@dataclass(frozen=True)
class IngestRequest:
    """One ingest request, and its meaning for the desired state.

    ``changes``: (audience, external id, member) in body order (native changes);
    ``snapshot``: (audience, members), the audience's whole membership.
    """

    label: str
    method: str
    path: str
    content_type: str
    body: bytes
    changes: tuple[tuple[str, str, bool], ...] = ()
    snapshot: tuple[str, frozenset[str]] | None = None


def ndjson_request(changes: Sequence[tuple[str, Account, bool]], label: str) -> IngestRequest:
    return IngestRequest(
        label=label,
        method="POST",
        path="/v1/changes",
        content_type="application/x-ndjson",
        body=changes_ndjson(changes),
        changes=tuple((aud, account.external_id, member) for aud, account, member in changes),
    )


def snapshot_request(audience: str, accounts: Sequence[Account], label: str) -> IngestRequest:
    return IngestRequest(
        label=label,
        method="PUT",
        path=f"/v1/audiences/{audience}/members",
        content_type="text/csv",
        body=encode_accounts(accounts),
        snapshot=(audience, frozenset(a.external_id for a in accounts)),
    )


@dataclass
class DesiredState:
    """Per audience, the members the accepted requests add up to (last write wins)."""

    members: dict[str, set[str]] = field(
        default_factory=lambda: {audience: set() for audience, _ in AUDIENCES}
    )

    def apply(self, request: IngestRequest) -> int:
        """Apply an accepted request; the journal rows it makes (the ledger's ``received``)."""
        if request.snapshot is not None:
            # Only the difference becomes journal rows: members it keeps (same name and
            # domain: the pool's accounts never change) are not appended again.
            audience, wanted = request.snapshot
            removed = self.members[audience] - wanted
            added = wanted - self.members[audience]
            self.members[audience] = set(wanted)
            return len(added) + len(removed)
        for audience, external_id, member in request.changes:
            if member:
                self.members[audience].add(external_id)
            else:
                self.members[audience].discard(external_id)
        return len(request.changes)

    def after(self, request: IngestRequest) -> dict[str, set[str]]:
        """The members if ``request`` were applied too, leaving this state as it is."""
        other = DesiredState({a: set(m) for a, m in self.members.items()})
        other.apply(request)
        return other.members


class Cdp:
    """Sends ingest requests and keeps count of what the daemon accepted.

    ``pending`` is the request whose answer a kill swallowed: it is sent again first
    after the restart. ``received_min``/``received_max`` bound the journal rows the
    store must have counted per audience: a request that was committed but not
    answered, then sent again, is counted twice by the store.
    """

    def __init__(self, session: aiohttp.ClientSession, ingest: str) -> None:
        self._session = session
        self._ingest = ingest
        self.desired = DesiredState()
        self.pending: IngestRequest | None = None
        self.accepted = 0
        self.unanswered = 0
        self.received_min = {audience: 0 for audience, _ in AUDIENCES}
        self.received_max = {audience: 0 for audience, _ in AUDIENCES}

    async def send(self, request: IngestRequest, *, chunk_seconds: float = 0.0) -> bool:
        """Send ``request``; True once accepted (202). A dead daemon leaves it pending.

        ``chunk_seconds`` streams the body in 64 KiB chunks with that pause between
        them, so that a kill can land while the body is on the wire.
        """
        assert self.pending is None or self.pending is request, "re-send the pending one first"
        # A file-like body: aiohttp warns that big bytes would block the loop.
        body: io.BytesIO | aiohttp.AsyncIterablePayload = io.BytesIO(request.body)
        if chunk_seconds:
            body = aiohttp.AsyncIterablePayload(_chunks(request.body, chunk_seconds))
        try:
            async with self._session.request(
                request.method,
                f"{self._ingest}{request.path}",
                data=body,
                headers={"Content-Type": request.content_type},
            ) as response:
                text = await response.text()
                status = response.status
        except aiohttp.ClientError:
            # No answer: the daemon died before, while or after it committed.
            if self.pending is None:
                self.unanswered += 1
            self.pending = request
            return False
        assert status == 202, f"{request.label}: {status} {text}"
        self._accepted(request)
        return True

    async def resend_pending(self) -> None:
        if self.pending is not None:
            accepted = await self.send(self.pending)
            assert accepted, f"{self.pending.label}: no answer from a healthy daemon"

    def _accepted(self, request: IngestRequest) -> None:
        resent = self.pending is request
        self.pending = None
        self.accepted += 1
        rows = self.desired.apply(request)
        audiences = (
            {request.snapshot[0]}
            if request.snapshot is not None
            else {audience for audience, _, _ in request.changes}
        )
        for audience in audiences:
            own = (
                rows
                if request.snapshot is not None
                else sum(1 for a, _, _ in request.changes if a == audience)
            )
            self.received_min[audience] += own
            self.received_max[audience] += own
            if resent and request.snapshot is None:
                # The first send may have been committed too, and counted. (A snapshot
                # sent again finds the state it makes: no difference, no rows.)
                self.received_max[audience] += own


async def _chunks(body: bytes, pause_seconds: float) -> AsyncIterator[bytes]:
    size = 64 * 1024
    for start in range(0, len(body), size):
        yield body[start : start + size]
        await asyncio.sleep(pause_seconds)


# --- what Demandbase holds, what the store holds --------------------------------------------


def emulator_lists(emulator: Emulator) -> dict[str, set[str]]:
    """Per audience, the true members of its Demandbase list (empty if never created)."""
    lists = emulator.tenant.lists
    return {
        audience: set(lists[name].members) if name in lists else set()
        for audience, name in AUDIENCES
    }


@dataclass(frozen=True)
class StoreView:
    """The store as a restarted daemon would find it."""

    desired: dict[str, set[str]]  # folded membership, then the journal applied in seq order
    journal_rows: int
    dirty: int  # accounts whose desired and delivered states differ
    in_flight: int
    rejected: int
    open_batches: int
    open_jobs: dict[int, tuple[str, int | None]]  # open batch -> (state, Demandbase job id)
    batches: int
    batch_rows: dict[tuple[str, str], int]  # (audience, state) -> rows
    ledger: dict[str, dict[str, int]]
    checkpoints: dict[str, tuple[int, int]]  # audience -> (checkpoint_seq, folded_seq)

    @property
    def settled(self) -> bool:
        """Everything folded and delivered, nothing in flight."""
        return not (self.journal_rows or self.dirty or self.in_flight or self.open_batches)


def read_store(database: Path) -> StoreView:
    """Read the store without writing a byte (``mode=ro``): safe beside a live daemon."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10.0)
    try:
        db.execute("BEGIN")  # one snapshot for every query below
        desired: dict[str, set[str]] = {audience: set() for audience, _ in AUDIENCES}
        for audience, key in db.execute(
            "SELECT audience_id, external_id FROM membership"
            " JOIN audience_keys USING (audience_key) WHERE desired = 1"
        ):
            desired.setdefault(audience, set()).add(key)
        journal = db.execute(
            "SELECT audience_id, external_id, member FROM changes ORDER BY seq"
        ).fetchall()
        for audience, key, member in journal:
            members = desired.setdefault(audience, set())
            if member:
                members.add(key)
            else:
                members.discard(key)
        dirty, in_flight, rejected = db.execute(
            "SELECT TOTAL(desired <> delivered), TOTAL(in_flight IS NOT NULL), TOTAL(rejected)"
            " FROM membership"
        ).fetchone()
        batch_rows: dict[tuple[str, str], int] = {}
        batches = open_batches = 0
        for audience, state, count, rows in db.execute(
            "SELECT audience_id, state, COUNT(*), TOTAL(rows) FROM batches"
            " GROUP BY audience_id, state"
        ):
            batch_rows[(audience, state)] = int(rows)
            batches += count
            if state in ("planned", "created", "uploaded"):
                open_batches += count
        open_jobs = {
            batch_id: (state, job_id)
            for batch_id, state, job_id in db.execute(
                "SELECT batch_id, state, job_id FROM batches"
                " WHERE state IN ('planned', 'created', 'uploaded')"
            )
        }
        ledger: dict[str, dict[str, int]] = {}
        for audience, counter, value in db.execute(
            "SELECT audience_id, counter, value FROM ledger"
        ):
            ledger.setdefault(audience, {})[counter] = value
        checkpoints = {
            audience: (checkpoint, folded)
            for audience, checkpoint, folded in db.execute(
                "SELECT audience_id, checkpoint_seq, folded_seq FROM audiences"
            )
        }
        db.execute("COMMIT")
    finally:
        db.close()
    return StoreView(
        desired=desired,
        journal_rows=len(journal),
        dirty=int(dirty),
        in_flight=int(in_flight),
        rejected=int(rejected),
        open_batches=open_batches,
        open_jobs=open_jobs,
        batches=batches,
        batch_rows=batch_rows,
        ledger=ledger,
        checkpoints=checkpoints,
    )


def batch_states(database: Path) -> dict[int, str]:
    """Every batch the store ever planned, and its state."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10.0)
    try:
        return dict(db.execute("SELECT batch_id, state FROM batches").fetchall())
    finally:
        db.close()


# The scenarios poll SQLite files, logs and a subprocess: every 100 ms is plenty.
wait_until = functools.partial(testing.wait_until, poll_seconds=0.1)


def difference(expected: dict[str, set[str]], actual: dict[str, set[str]]) -> str:
    """Per audience, what is missing and what is extra (a few ids each)."""
    found = list_differences(expected, actual)
    return "; ".join(f"{audience}: {what}" for audience, what in found.items()) or "equal"


def assert_settled_store(view: StoreView, cdp: Cdp) -> None:
    """After a graceful stop: all delivered, and the ledger accounts for every row."""
    assert view.desired == cdp.desired.members, difference(cdp.desired.members, view.desired)
    assert view.settled, view
    assert view.rejected == 0, view
    for audience, _ in AUDIENCES:
        ledger = view.ledger.get(audience, {})
        received = ledger.get("received", 0)
        # Nothing accepted is lost (at most a re-sent request was counted twice).
        assert cdp.received_min[audience] <= received <= cdp.received_max[audience], (
            audience,
            received,
            cdp.received_min[audience],
            cdp.received_max[audience],
        )
        completed = view.batch_rows.get((audience, "completed"), 0)
        failed = view.batch_rows.get((audience, "failed"), 0)
        # Acknowledged means exactly the rows of completed jobs, and every uploaded row
        # was either acknowledged or failed: the ledger balances, nothing is processing.
        assert ledger.get("acknowledged", 0) == completed, (audience, ledger, view.batch_rows)
        assert ledger.get("failed", 0) == failed, (audience, ledger, view.batch_rows)
        assert ledger.get("exported", 0) == completed + failed, (audience, ledger)
        if cdp.desired.members[audience]:
            assert completed >= len(cdp.desired.members[audience]), (audience, ledger)
        checkpoint, folded = view.checkpoints[audience]
        assert checkpoint == folded, (audience, checkpoint, folded)
