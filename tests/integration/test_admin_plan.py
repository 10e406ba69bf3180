"""``dbsync ctl plan``: the next batches and read-backs, against a real daemon; nothing sent.

The daemon runs in process beside the test with the emulator on loopback; ``dbsync
ctl`` runs as its own process where the printed output or the exit code is the point.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dbsync.demandbase.emulator import Faults
from dbsync.exitcodes import ExitCode
from dbsync.testing import (
    FAST_RECONCILE,
    AudienceConfig,
    fast_export_tenant,
    last_report,
    running_engine,
    running_reconcile_engine,
    wait_until,
)

# Due only when flushed (an hour's max age): every pending account fits one batch.
LAZY = AudienceConfig("lazy", "Renewals", max_records=1_000, max_age_seconds=3600.0)
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 8.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dbp", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def ctl(sock: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dbsync",
        "ctl",
        "--socket",
        str(sock),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_plan_shows_the_next_batches_and_sends_nothing(short_dir: Path) -> None:
    """1. LAZY (max age an hour, 1,000 rows a batch) gets 10 accounts, flushed and
       delivered; then 25 more are added and 4 of the first removed: folded, they wait.
    2. ``dbsync ctl plan lazy --json``, ``plan lazy --limit 1 --json``, ``plan lazy``.
    Result: the plan shows a delete batch of 4 then an insert batch of 25 (the actor
    alternates, and its last batch was an insert), each to start once its oldest
    change is an hour old; 2 jobs; one batch and "1 more" with ``--limit 1``; the
    table names both actions and no Python repr. The emulator saw no new job and the
    store is as it was: the same backlog, no open batch, the same ledger."""
    sock = short_dir / "admin.sock"
    async with running_engine(short_dir, [LAZY], daemon={"admin_socket": str(sock)}) as engine:
        first = await engine.tenant_accounts(10)
        await engine.cdp.changes([(LAZY.id, a, True) for a in first])
        await engine.wait_folded()
        code, out, err = await ctl(sock, "flush", LAZY.id)
        assert code == ExitCode.OK, err
        await engine.wait_settled()

        more = await engine.tenant_accounts(25, offset=10)
        await engine.cdp.changes(
            [(LAZY.id, a, True) for a in more] + [(LAZY.id, a, False) for a in first[:4]]
        )
        await engine.wait_folded()
        backlog = await engine.store.backlog(LAZY.id)
        assert (backlog.inserts, backlog.deletes) == (25, 4)
        assert backlog.oldest_changed_at is not None
        ledger = await engine.store.ledger_check(LAZY.id, recount=False)
        emulator = engine.emulator.emulator
        jobs = len(emulator.tenant.import_jobs)

        code, out, err = await ctl(sock, "plan", LAZY.id, "--json")
        assert code == ExitCode.OK, err
        plan: dict[str, Any] = json.loads(out)
        assert plan["reply"] == "plan"
        assert (plan["audience"], plan["state"], plan["held"]) == (LAZY.id, "active", False)
        assert (plan["pending_inserts"], plan["pending_deletes"]) == (25, 4)
        assert plan["backlog_jobs"] == 2
        assert [(b["action"], b["accounts"]) for b in plan["batches"]] == [
            ("delete", 4),
            ("insert", 25),
        ]
        assert plan["more_batches"] == 0
        for batch in plan["batches"]:
            # Not due before its oldest change is an hour old (max_age_seconds).
            assert batch["earliest_start_at"] >= backlog.oldest_changed_at + 3600.0 - 1.0
        assert plan["backlog_eta"] >= plan["batches"][-1]["earliest_start_at"]
        read_back = plan["read_back"]
        assert read_back["multi_list"] is False
        assert read_back["export_group"] == []

        code, out, err = await ctl(sock, "plan", LAZY.id, "--limit", "1", "--json")
        assert code == ExitCode.OK, err
        one = json.loads(out)
        assert [(b["action"], b["accounts"]) for b in one["batches"]] == [("delete", 4)]
        assert one["more_batches"] == 1

        code, out, err = await ctl(sock, "plan", LAZY.id)
        assert code == ExitCode.OK, err
        assert "nothing was sent" in out
        assert "BATCH  ACTION" in out
        lines = out.splitlines()
        assert any(line.split()[:3] == ["1", "delete", "4"] for line in lines), out
        assert any(line.split()[:3] == ["2", "insert", "25"] for line in lines), out
        assert "PlannedBatchView" not in out
        assert "None" not in out

        # Nothing was sent, nothing marked.
        assert len(emulator.tenant.import_jobs) == jobs
        assert await engine.store.backlog(LAZY.id) == backlog
        assert await engine.store.open_batches(LAZY.id) == []
        assert await engine.store.ledger_check(LAZY.id, recount=False) == ledger


async def test_plan_of_an_unknown_audience_is_a_fault(short_dir: Path) -> None:
    """``plan nope`` and ``plan nope --json``.
    Result: exit 1 (the daemon refused), naming the audiences it knows;
    ``unknown_audience`` in the one JSON document printed."""
    sock = short_dir / "admin.sock"
    async with running_engine(short_dir, [LAZY], daemon={"admin_socket": str(sock)}):
        await wait_until(lambda: sock.exists(), TIMEOUT)
        code, out, err = await ctl(sock, "plan", "nope")
        assert code == ExitCode.FAULT
        assert "no audience 'nope' (known: lazy)" in err
        code, out, _ = await ctl(sock, "--json", "plan", "nope")
        assert code == ExitCode.FAULT
        assert json.loads(out)["code"] == "unknown_audience"


async def test_plan_names_the_audiences_one_multi_list_export_reads(short_dir: Path) -> None:
    """1. Three audiences of 10 members, multi-list exports on (the emulator's
       ``multi-list-column`` dialect), read back a second after delivery, then every
       minute: their first read-backs share one export job.
    2. Once each is verified, ``plan multi-0 --json``.
    Result: the next read-back is planned (a minute after the last), multi-list, and
    its export group is the audiences due by then (a minute after their last
    read-back began) that no earlier job reads: all three when their first read-backs
    shared one job; when one had its own first export a moment before the others', it
    falls due first and is planned alone, before them. No batch."""
    audiences = [
        AudienceConfig(f"multi-{i}", max_records=100, max_age_seconds=0.05) for i in range(3)
    ]
    sock = short_dir / "admin.sock"
    async with running_reconcile_engine(
        short_dir,
        audiences,
        tenant=fast_export_tenant(
            visibility_lag_seconds=0.1, faults=Faults(dialects=frozenset({"multi-list-column"}))
        ),
        reconcile={
            **FAST_RECONCILE,
            "multi_list_exports": "yes",
            "interval_seconds": 60.0,
            "visibility_lag_seconds": 1.0,
        },
        daemon={"admin_socket": str(sock)},
    ) as engine:
        pool = await engine.tenant_accounts(30)
        await engine.cdp.changes(
            (audience.id, account, True)
            for i, audience in enumerate(audiences)
            for account in pool[i * 10 : (i + 1) * 10]
        )

        def verified() -> bool:
            reports = [last_report(engine, a.id) for a in audiences]
            return all(r is not None and r.verified == 10 for r in reports)

        await wait_until(verified, 30.0, what="every audience verified")

        def planned() -> bool:
            # The reconciler plans again once a job's lists are judged and it looks
            # again (a moment after the reports): each next read-back after the last.
            for a in audiences:
                report = last_report(engine, a.id)
                _, next_at = engine.supervisor.reconcile_state(a.id)
                if report is None or next_at is None or next_at < report.started_at + 60.0:
                    return False
            return True

        await wait_until(planned, 30.0, what="the next read-backs planned")
        exports = engine.emulator.emulator.tenant.export_jobs
        assert sum(len(job.list_ids) for job in exports) == 3

        code, out, err = await ctl(sock, "plan", "multi-0", "--json")
        assert code == ExitCode.OK, err
        plan = json.loads(out)
        assert plan["batches"] == []
        read_back = plan["read_back"]
        assert read_back["multi_list"] is True
        started = {
            a.id: report.started_at for a in audiences if (report := last_report(engine, a.id))
        }
        next_at = read_back["next_reconcile_at"]
        assert next_at >= started["multi-0"] + 60.0
        due = sorted(a for a, at in started.items() if at + 60.0 <= next_at)
        assert "multi-0" in due
        # Due by then and not read by an earlier job: one acknowledged a moment earlier
        # had its own first export, so it falls due first and goes alone.
        predicted = {a.id: engine.supervisor.reconcile_state(a.id)[1] for a in audiences}
        earlier = [a for a in due if (predicted[a] or 0.0) < next_at]
        assert sorted(read_back["export_group"]) == [a for a in due if a not in earlier]
        assert all(started[a] < started["multi-0"] for a in earlier), (started, predicted)
        if len(exports) == 1:
            assert due == [a.id for a in audiences]
        code, out, err = await ctl(sock, "plan", "multi-0")
        assert code == ExitCode.OK, err
        others = [a for a in read_back["export_group"] if a != "multi-0"]
        assert f"in one export job with {len(others)} other audiences" in out, out
