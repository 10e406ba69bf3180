"""The store judges plain accounts in SQL and the rest in Python: the two agree.

``apply_readback`` counts and clears the *plain* accounts (settled, old enough, where
the list says they should be) with set-based SQL, and reads only the others out for
:func:`~dbsync.judgment.judge_chunk`. Here random audiences, written straight into a
real store file in every state an account can be in (pending, in flight, set aside,
tried again, young, awaiting an acknowledgment's verdict, repaired up to and past the
limit), are judged against random lists (members missing, removed accounts listed,
strangers, accounts matched by domain and name only) in chunks of several sizes; the
oracle is ``judge_chunk`` over every account at once. Verdict, every account's row,
the set-aside table and each batch's verified and lost counts must match exactly.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dbsync.clock import FakeClock
from dbsync.judgment import Judgment, Listing, judge_chunk, match_listed
from dbsync.model import AudienceSpec, ListedAccount, ReadbackVerdict
from dbsync.store import Store
from dbsync.store.audiences import KEY, key_of

CUTOFF = 1500.0
OLD, YOUNG = 1000.0, 2000.0
REPAIR_LIMIT = 3
BATCHES = (1, 2, 3)
SCENARIOS = 40
KEY1 = key_of("?1")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "dbsync.sqlite3", clock=FakeClock(start=YOUNG)) as store:
        await store.sync_audiences(
            [
                AudienceSpec(audience_id=f"aud-{n}", destination="d", name="A", list_name=f"L{n}")
                for n in range(SCENARIOS)
            ]
        )
        yield store


def random_rows(rng: random.Random, audience: str) -> list[tuple[Any, ...]]:
    """Membership rows of every shape the judgment distinguishes."""
    rows = []
    for i in range(rng.randrange(0, 40)):
        desired = rng.random() < 0.7
        delivered = desired if rng.random() < 0.8 else not desired
        rows.append(
            (
                audience,
                f"k{i:03d}",
                f"Company {i}",
                f"c{i}.example",
                int(desired),
                i + 1,
                rng.choice((OLD, CUTOFF, YOUNG)),
                int(delivered),
                9 if rng.random() < 0.1 else None,
                int(rng.random() < 0.1),
                rng.choice((None, OLD, OLD, CUTOFF, YOUNG)),
                rng.choice((None, *BATCHES)),
                rng.choice((0, 0, 0, 1, REPAIR_LIMIT, REPAIR_LIMIT + 1)),
            )
        )
    return rows


def random_listing(rng: random.Random, rows: list[tuple[Any, ...]]) -> list[ListedAccount]:
    listed = []
    for row in rows:
        key, name, domain, desired = row[1], row[2], row[3], row[4]
        if rng.random() < (0.85 if desired else 0.2):
            if rng.random() < 0.05:  # matched by domain and name, under another id
                listed.append(ListedAccount(external_id="", name=name.upper(), domain=domain))
            else:
                listed.append(ListedAccount(external_id=key, name=name, domain=domain))
    if rng.random() < 0.2:
        listed.append(ListedAccount(external_id="zz-stranger", name="Z", domain="z.example"))
    rng.shuffle(listed)
    return listed


def expected_rows(rows: list[tuple[Any, ...]], decision: Any) -> dict[str, tuple[Any, ...]]:
    """(delivered, rejected, ack_batch, repairs) of each account after the oracle's decision."""
    state = {row[0]: [row[4], row[6], row[8], row[10]] for row in rows}
    for key in decision.cleared:
        state[key][2:] = [None, 0]
    for keys, delivered in ((decision.resend_inserts, 0), (decision.resend_deletes, 1)):
        for key in keys:
            state[key] = [delivered, state[key][1], None, state[key][3] + 1]
    for key in decision.extras:
        state[key][0] = 1
    for accounts, delivered in ((decision.unmatched, 0), (decision.not_removable, 1)):
        for account, _ in accounts:
            state[account.external_id][:3] = [delivered, 1, None]
    return {key: tuple(value) for key, value in state.items()}


@pytest.mark.parametrize("chunk_rows", [20_000, 7, 1])
async def test_plain_accounts_in_sql_agree_with_the_rule_account_by_account(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    monkeypatch.setattr("dbsync.store.readback.JUDGE_CHUNK_ROWS", chunk_rows)
    rng = random.Random(chunk_rows)
    db = sqlite3.connect(tmp_path / "dbsync.sqlite3", isolation_level=None)
    seen_plain = seen_python = 0
    try:
        for n in range(SCENARIOS):
            audience = f"aud-{n}"
            rows = random_rows(rng, audience)
            retrying = {r[1] for r in rows if not r[9] and rng.random() < 0.1}
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO membership (audience_key, external_id, name, domain, desired, seq,"
                " changed_at, delivered, in_flight, rejected, acked_at, ack_batch, repairs)"
                f" VALUES ({KEY}, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # Set aside (rejected = 1), and set aside once but tried again (retrying).
            db.execute(
                "INSERT INTO rejected (audience_id, external_id, name, domain, member, reason,"
                " rejected_at, attempts) SELECT ?1, external_id, name, domain, desired,"
                f" 'unmatched: before', 1.0, 1 FROM membership WHERE audience_key = {KEY1}"
                " AND (rejected = 1 OR external_id IN (SELECT value FROM json_each(?2)))",
                (audience, json.dumps(sorted(retrying))),
            )
            db.executemany(
                "INSERT OR IGNORE INTO batches (batch_id, audience_id, action, state, rows,"
                " created_at, updated_at) VALUES (?, ?, 'insert', 'completed', 1, 1.0, 1.0)",
                [(n * 10 + b, audience) for b in BATCHES],
            )
            db.execute(
                "UPDATE membership SET ack_batch = ? * 10 + ack_batch"
                f" WHERE audience_key = {KEY} AND ack_batch IS NOT NULL",
                (n, audience),
            )
            db.execute("COMMIT")
            member_rows = db.execute(
                "SELECT external_id, name, domain, desired, delivered, in_flight, rejected,"
                " acked_at, ack_batch, changed_at, repairs FROM membership"
                f" WHERE audience_key = {KEY} ORDER BY external_id",
                (audience,),
            ).fetchall()
            listed = random_listing(rng, rows)

            present, strangers, nameless = match_listed([r[:3] for r in member_rows], listed)
            decision = judge_chunk(
                member_rows, present, judged_before=CUTOFF, repair_limit=REPAIR_LIMIT
            )
            judgment = Judgment()
            judgment.add(decision, strangers_removed=len(strangers))
            oracle = judgment.verdict(
                Listing(
                    listed=len(listed),
                    strangers=strangers,
                    nameless=nameless,
                    judged_before=CUTOFF,
                    repair_limit=REPAIR_LIMIT,
                    now=YOUNG,
                )
            )
            cleared_retrying = retrying.intersection(decision.cleared)
            rejected_before = {
                row[0]
                for row in db.execute(
                    "SELECT external_id FROM rejected WHERE audience_id = ?", (audience,)
                )
            }

            run = await store.start_reconcile_run(audience, n, f"job-{n}", CUTOFF)
            verdict = await store.apply_readback(
                run.run_id, listed, judged_before=CUTOFF, repair_limit=REPAIR_LIMIT
            )

            assert isinstance(verdict, ReadbackVerdict)
            assert verdict == oracle, audience
            after = {
                row[0]: row[1:]
                for row in db.execute(
                    "SELECT external_id, delivered, rejected, ack_batch, repairs FROM membership"
                    f" WHERE audience_key = {KEY}"
                    " AND external_id NOT IN (SELECT value FROM json_each(?))",
                    (audience, json.dumps(list(strangers))),
                )
            }
            assert after == expected_rows(member_rows, decision), audience
            rejected_after = {
                row[0]
                for row in db.execute(
                    "SELECT external_id FROM rejected WHERE audience_id = ?", (audience,)
                )
            }
            set_aside = {a.external_id for a, _ in decision.unmatched + decision.not_removable}
            assert rejected_after == (rejected_before - cleared_retrying) | set_aside, audience
            batches = {
                row[0] % 10: row[1:]
                for row in db.execute(
                    "SELECT batch_id, verified, lost FROM batches WHERE audience_id = ?",
                    (audience,),
                )
            }
            assert batches == {
                b: (
                    decision.batch_verified.get(n * 10 + b, 0),
                    decision.batch_lost.get(n * 10 + b, 0),
                )
                for b in BATCHES
            }, audience
            # Both ways were taken: some accounts plain, some judged in Python.
            seen_plain += decision.verified
            seen_python += decision.unsettled + decision.too_young + len(decision.cleared)
            # The scratch rows of a finished run are gone.
            assert (
                await store.apply_readback(
                    run.run_id, listed, judged_before=CUTOFF, repair_limit=REPAIR_LIMIT
                )
                is None
            )
    finally:
        db.close()
    assert seen_plain > 100
    assert seen_python > 100
