"""Read-back: judging a whole list against the store, and what ingest waits meanwhile.

A read-back compares every account of an audience with its list's members in one
store transaction (``Store.apply_readback``), so that a verdict and its repairs land
together. That transaction holds the store's one writer: an ingest commit arriving
during it waits. This script builds one audience of ``--accounts`` acknowledged
members in a real SQLite file, then judges a list that lost 5% of them and holds 1%
strangers, while a CDP stand-in commits a one-change request every 10 ms.

Figures: the judgment's time and accounts/s; the ingest commit latency, p50 with the
store otherwise idle (the baseline, measured in the same run) and the worst during
the judgment, with their ratio; and that the verdict found exactly the losses made.

    python bench/readback.py [--accounts 100000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from bench._common import add_check_flag, emit, say
from dbsync.clock import FakeClock
from dbsync.model import Account, AudienceSpec, Change, ListAction, ListedAccount
from dbsync.store import Store

AUDIENCE = "bench-readback"
LOST_SHARE = 0.05
STRANGER_SHARE = 0.01
BATCH = 10_000
COMMIT_EVERY_SECONDS = 0.01


def account(i: int) -> Account:
    return Account(external_id=f"acct-{i:08d}", name=f"Company {i}", domain=f"c{i}.example")


async def one_commit(store: Store, clock: FakeClock, i: int) -> float:
    """A one-change ingest request (to another audience), as the ingest server commits it."""
    change = Change(audience_id="other", account=account(i), member=True, ts=clock.time())
    started = time.perf_counter()
    await store.append_changes([change])
    return time.perf_counter() - started


async def measure(path: Path, accounts: int, seed: int) -> dict[str, object]:
    clock = FakeClock(start=1_000.0)
    async with Store.open(path, clock=clock) as store:
        await store.sync_audiences(
            [
                AudienceSpec(audience_id=AUDIENCE, destination="d", name="A", list_name="A"),
                AudienceSpec(audience_id="other", destination="d", name="B", list_name="B"),
            ]
        )
        members = [account(i) for i in range(accounts)]
        for offset in range(0, accounts, BATCH):
            await store.append_changes(
                [
                    Change(audience_id=AUDIENCE, account=a, member=True, ts=clock.time())
                    for a in members[offset : offset + BATCH]
                ]
            )
        while await store.fold_pending():
            pass
        while (batch := await store.plan_batch(AUDIENCE, ListAction.INSERT, BATCH)) is not None:
            await store.mark_created(batch.batch_id, 1)
            await store.mark_uploaded(batch.batch_id)
            await store.complete_batch(batch.batch_id, list_id=7)
        await clock.advance(1_000.0)  # every acknowledgment is older than the lag

        rng = random.Random(seed)
        dropped = set(rng.sample(range(accounts), int(accounts * LOST_SHARE)))
        listed = [
            ListedAccount(external_id=a.external_id, name=a.name, domain=a.domain)
            for i, a in enumerate(members)
            if i not in dropped
        ]
        strangers = int(accounts * STRANGER_SHARE)
        listed += [
            ListedAccount(external_id=f"stranger-{i}", name=f"Stranger {i}", domain=f"s{i}.example")
            for i in range(strangers)
        ]
        rng.shuffle(listed)
        say(f"{accounts:,} acknowledged members; the list lost {len(dropped):,}, holds")
        say(f"{strangers:,} strangers: {len(listed):,} listed accounts to judge")

        idle = [await one_commit(store, clock, i) for i in range(100)]
        baseline = statistics.median(idle)

        run = await store.start_reconcile_run(AUDIENCE, 7, "bench", clock.time())
        during: list[float] = []
        judged = asyncio.Event()

        async def ingest() -> None:
            i = 1_000
            while not judged.is_set():
                during.append(await one_commit(store, clock, i))
                i += 1
                await asyncio.sleep(COMMIT_EVERY_SECONDS)

        feeder = asyncio.create_task(ingest())
        await asyncio.sleep(COMMIT_EVERY_SECONDS)
        started = time.perf_counter()
        verdict = await store.apply_readback(
            run.run_id, listed, judged_before=clock.time() - 500.0, repair_limit=3
        )
        seconds = time.perf_counter() - started
        judged.set()
        await feeder
        assert verdict is not None
        check = await store.ledger_check(AUDIENCE)

    worst = max(during)
    say(f"judged in {seconds:.2f} s: {accounts / seconds:,.0f} accounts/s")
    say(f"verdict: {verdict.verified:,} verified, lost {verdict.lost}, extra")
    say(f"  {verdict.extra_removed:,}; ledger balanced: {check.balanced}")
    say(f"ingest commit: p50 {baseline * 1000:.2f} ms idle, worst {worst * 1000:.1f} ms during")
    say(f"  the judgment ({len(during)} commits), {worst / baseline:,.0f}x")
    return {
        "accounts": accounts,
        "listed": len(listed),
        "judge_seconds": round(seconds, 3),
        "accounts_per_second": round(accounts / seconds),
        "verified": verdict.verified,
        "lost": sum(verdict.lost.values()),
        "lost_made": len(dropped),
        "extra_removed": verdict.extra_removed,
        "ledger_balanced": check.balanced,
        "ingest_commit_idle_p50_ms": round(baseline * 1000, 3),
        "ingest_commit_during_max_ms": round(worst * 1000, 1),
        "ingest_commits_during": len(during),
        "ratio": round(worst / baseline, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="10,000 accounts")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.accounts = 10_000
    with tempfile.TemporaryDirectory(prefix="dbsync-bench-") as tmp:
        figures = uvloop.run(measure(Path(tmp) / "store.db", args.accounts, args.seed))
    return emit("readback", figures, check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())
