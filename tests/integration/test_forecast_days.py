"""The backlog forecast against emulated days: it names the window delivery ends in.

The emulator's day lasts 4 s and allows 4 import jobs; the daemon knows the same
limits with no safety margin (4 jobs a day). Two audiences, batches of 5 accounts:
the older backlog (35 accounts, 7 jobs) and the younger (20 accounts, 4 jobs), 11
jobs in all, arriving at the start of a day: three days of budget. The forecast is
read once, through ``dbsync ctl status`` over the admin socket, right after the
backlog is folded; then the days go by and each audience's last batch is
acknowledged.

The bound, in windows (counts, never durations): each audience's backlog is
delivered in the window its forecast named at the start, give or take one. The
destination's window is exact arithmetic here (11 jobs at 4 a day from the start of
a day: the start window + 2), and the younger, smaller backlog is named no later
than the older: the budget takes turns, so their jobs alternate and the larger one
ends last. Which audience's jobs take the last slots of a day depends on which actor
asks first while the other holds its ``max_jobs_in_flight``, as the forecast models
it; the slack of one window is for what it cannot know: the order in which the
actors' requests reach the budget, and a job started just before a window's edge
that completes after it.

The days go by in real time (the emulator's day and the daemon's budget both read
the system clock), as in ``test_engine_quotas.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbsync.admin.client import exchange
from dbsync.admin.protocol import Status, StatusReply
from dbsync.testing import DESTINATION, AudienceConfig, fast_tenant, running_engine, wait_until

DAY_SECONDS = 4.0
JOBS_PER_DAY = 4
ROWS_PER_JOB = 5
OLDER = AudienceConfig("older", max_records=ROWS_PER_JOB, max_age_seconds=0.05)
YOUNGER = AudienceConfig("younger", max_records=ROWS_PER_JOB, max_age_seconds=0.05)
ACCOUNTS = {OLDER.id: 35, YOUNGER.id: 20}  # 7 and 4 jobs
# Each backlog needs two days more (8 s): far past the warning's bound.
WARN_HOURS = 2 / 3600


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dbf", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(120)
async def test_delivery_ends_in_the_window_the_forecast_named(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Emulator and daemon: 4 import jobs (uploads, 40 status reads) a 4 s day.
    2. At the start of a day, 35 accounts to the older audience, then 20 to the
       younger one; once folded, ``status`` over the admin socket.
       A summary round (``backlog_eta_warn_hours`` is 2 s here).
    3. Wait until both backlogs are delivered; a summary round again.
    Result: the forecast named the start window + 2 for the destination and the
    younger audience, no later for the older; each audience's last batch was
    acknowledged in its named window, +-1; 11 jobs in all, no window saw more than 4
    and Demandbase answered no 429. The first summary round carried each audience's
    forecast (the same windows) and warned once per audience (``backlog_eta_exceeded``);
    the second said both recovered."""
    quotas = {
        "import_jobs_per_day": JOBS_PER_DAY,
        "import_uploads_per_day": JOBS_PER_DAY,
        "import_status_per_day": 40,
        "concurrent_import_jobs": 3,
    }
    sock = short_dir / "admin.sock"
    async with running_engine(
        short_dir,
        [OLDER, YOUNGER],
        tenant=fast_tenant(day_seconds=DAY_SECONDS, **quotas),
        limits={**quotas, "day_seconds": DAY_SECONDS, "quota_safety_margin": 0.0},
        daemon={"admin_socket": str(sock)},
        delivery={"backlog_eta_warn_hours": WARN_HOURS},
    ) as engine:
        older, younger = (
            await engine.tenant_accounts(ACCOUNTS[OLDER.id]),
            await engine.tenant_accounts(ACCOUNTS[YOUNGER.id], offset=ACCOUNTS[OLDER.id]),
        )
        # Just after a day starts, so that the whole of it lies ahead.
        await asyncio.sleep(DAY_SECONDS - time.time() % DAY_SECONDS + 0.05)
        start = math.floor(time.time() / DAY_SECONDS)
        await engine.cdp.changes([(OLDER.id, a, True) for a in older])
        await engine.cdp.changes([(YOUNGER.id, a, True) for a in younger])
        await engine.wait_folded()

        reply = await asyncio.to_thread(exchange, sock, Status())
        assert isinstance(reply, StatusReply), reply
        named = {a.audience: a for a in reply.audiences}
        [destination] = reply.destinations
        # The first jobs (at most the 3 slots) may be in flight already: those are not
        # jobs to come.
        assert 11 - 3 <= (destination.backlog_jobs or 0) <= 11, reply.audiences
        assert destination.backlog_eta is not None
        windows = {
            audience: math.floor((view.backlog_eta or 0.0) / DAY_SECONDS) - start
            for audience, view in named.items()
        }
        assert read_within_the_start_window(start)
        # 11 jobs at 4 a day from the start of a day: the last in the third window,
        # whatever the share; by turns, the younger (smaller) backlog ends first.
        assert windows[YOUNGER.id] <= windows[OLDER.id] == 2, windows
        assert math.floor(destination.backlog_eta / DAY_SECONDS) - start == 2

        caplog.set_level(logging.INFO, logger="dbsync.summaries")
        await engine.supervisor.log_summaries()
        summaries = {r.audience: r for r in events(caplog, "audience_summary")}  # type: ignore[attr-defined]
        for audience, window in windows.items():
            # The same forecast, made a moment later: a job that started in between
            # (a turn taken) may move an audience by one window, never more.
            eta = summaries[audience].backlog_eta  # type: ignore[attr-defined]
            assert abs(math.floor(eta / DAY_SECONDS) - start - window) <= 1, (audience, eta)
        warned = [r.audience for r in events(caplog, "backlog_eta_exceeded")]  # type: ignore[attr-defined]
        assert sorted(warned) == [OLDER.id, YOUNGER.id]

        await wait_until(lambda: engine.idle(), 8 * DAY_SECONDS, what="both backlogs delivered")
        await engine.supervisor.log_summaries()
        recovered = [r.audience for r in events(caplog, "backlog_eta_recovered")]  # type: ignore[attr-defined]
        assert sorted(recovered) == [OLDER.id, YOUNGER.id]
        assert len(events(caplog, "backlog_eta_exceeded")) == 2
        for audience in (OLDER.id, YOUNGER.id):
            last = await engine.store.last_batch(audience)
            assert last is not None
            delivered = math.floor(last.finished_at / DAY_SECONDS) - start
            assert abs(delivered - windows[audience]) <= 1, (audience, delivered, windows)

        emulator = engine.emulator.emulator
        per_window = Counter(
            math.floor(job.created_at / DAY_SECONDS) for job in emulator.tenant.import_jobs
        )
        assert sum(per_window.values()) == 11
        assert max(per_window.values()) <= JOBS_PER_DAY, per_window
        assert emulator.stats()["throttled"] == 0
        assert await engine.lists_match_desired()
        assert engine.supervisor.destination(DESTINATION) is not None


def read_within_the_start_window(start: int) -> bool:
    """The forecast was read in the window the backlog arrived in (else the test's
    windows would be off by one for a reason of its own)."""
    return math.floor(time.time() / DAY_SECONDS) == start
