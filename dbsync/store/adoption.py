"""Adopting a list that already exists: its members are taken as delivered, not sent.

A customer moving from AEP's own Demandbase destination, or one whose state directory
was lost, already has the audience's list, filled. An audience whose ``list_id`` is
configured and whose store holds nothing delivered yet is therefore *adopted* before
its first send (:func:`request_first_adoptions`, at every start: once per audience),
or when the operator asks (``dbsync ctl adopt``, :func:`request_adoption`). While an
adoption is pending, the audience's actor sends nothing new; its reconciler reads the
list back and, before judging it, calls :func:`adopt_listed`:

* a pending member (desired, not delivered, not in flight, not set aside) that the list
  holds is taken as delivered: it leaves the queue, unsent;
* the read-back that follows judges the rest as usual: listed accounts that are not
  desired are marked for removal (``extra``), desired ones missing stay pending.

So only the difference is sent. The ledger counts ``adopted``: accounts taken as
delivered because their list held them. No sum includes it (nothing was exported or
acknowledged), and the ``pending`` sum keeps balancing because the queue's counters
move with the accounts; a later read-back judges adopted members like any account
seen in the list before (verified, or ``vanished`` and sent again).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import cast

from dbsync.judgment import OurAccount, match_listed
from dbsync.model import ListedAccount
from dbsync.store import ledger, queue
from dbsync.store.audiences import KEY, key_of
from dbsync.store.engine import Engine

__all__ = [
    "abandon_adoption",
    "adopt_listed",
    "adoption_pending",
    "adoptions_pending",
    "request_adoption",
    "request_first_adoptions",
]

_PENDING_MEMBERS = (
    f" FROM membership WHERE audience_key = {KEY} AND desired = 1 AND delivered = 0"
    " AND in_flight IS NULL AND rejected = 0"
)


async def request_first_adoptions(engine: Engine, audience_ids: Iterable[str]) -> list[str]:
    """Ask for the adoption of each audience never adopted whose store holds nothing
    delivered yet (no account delivered, no job ever acknowledged); returns those."""
    ids = sorted(set(audience_ids))

    def work(db: sqlite3.Connection) -> list[str]:
        asked = []
        for audience_id in ids:
            fresh = db.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM adoptions WHERE audience_id = ?1)"
                " AND NOT EXISTS (SELECT 1 FROM membership"
                f"  WHERE audience_key = {key_of('?1')}"
                "  AND delivered = 1)"
                " AND (SELECT first_acked_at IS NULL FROM audiences WHERE audience_id = ?1)",
                (audience_id,),
            ).fetchone()[0]
            if fresh:
                db.execute(
                    "INSERT INTO adoptions (audience_id, requested_at) VALUES (?, ?)",
                    (audience_id, engine.now()),
                )
                asked.append(audience_id)
        return asked

    return await engine.transaction(work)


async def request_adoption(engine: Engine, audience_id: str) -> None:
    """Ask for the audience's adoption now (``dbsync ctl adopt``), whatever it holds."""
    await engine.transaction(
        lambda db: db.execute(
            "INSERT INTO adoptions (audience_id, requested_at) VALUES (?, ?)"
            " ON CONFLICT DO UPDATE SET requested_at = excluded.requested_at, adopted_at = NULL",
            (audience_id, engine.now()),
        )
    )


async def adoption_pending(engine: Engine, audience_id: str) -> bool:
    rows = await engine.read(
        "SELECT 1 FROM adoptions WHERE audience_id = ? AND adopted_at IS NULL", (audience_id,)
    )
    return bool(rows)


async def adoptions_pending(engine: Engine, audience_ids: Iterable[str]) -> list[str]:
    """The audiences among ``audience_ids`` whose adoption is pending, oldest asked first."""
    wanted = set(audience_ids)
    rows = await engine.read(
        "SELECT audience_id FROM adoptions WHERE adopted_at IS NULL ORDER BY requested_at"
    )
    return [str(row[0]) for row in rows if row[0] in wanted]


async def adopt_listed(
    engine: Engine, audience_id: str, listed: Sequence[ListedAccount]
) -> int | None:
    """Take the audience's pending members that ``listed`` holds as delivered and close
    its adoption; returns how many (None: no adoption was pending)."""
    ours = cast(
        list[OurAccount],
        await engine.read("SELECT external_id, name, domain" + _PENDING_MEMBERS, (audience_id,)),
    )
    present, _, _ = match_listed(ours, listed)

    def work(db: sqlite3.Connection) -> int | None:
        pending = db.execute(
            "SELECT 1 FROM adoptions WHERE audience_id = ? AND adopted_at IS NULL",
            (audience_id,),
        ).fetchone()
        if pending is None:
            return None
        # Still pending, unsent: the rows may have moved since they were matched.
        taken = db.executemany(
            f"UPDATE membership SET delivered = 1 WHERE audience_key = {KEY} AND external_id = ?"
            " AND desired = 1 AND delivered = 0 AND in_flight IS NULL AND rejected = 0",
            [(audience_id, key) for key in sorted(present)],
        ).rowcount
        queue.move(db, audience_id, inserts=-taken)
        ledger.count(db, audience_id, adopted=taken)
        db.execute(
            "UPDATE adoptions SET adopted_at = ?, listed = ?, adopted = ? WHERE audience_id = ?",
            (engine.now(), len(listed), taken, audience_id),
        )
        queue.advance_checkpoint(db, audience_id)
        return taken

    return await engine.transaction(work)


async def abandon_adoption(engine: Engine, audience_id: str) -> bool:
    """Close a pending adoption without taking anything (its list could not be read);
    returns whether one was pending."""
    return bool(
        await engine.transaction(
            lambda db: (
                db.execute(
                    "UPDATE adoptions SET adopted_at = ?"
                    " WHERE audience_id = ? AND adopted_at IS NULL",
                    (engine.now(), audience_id),
                ).rowcount
            )
        )
    )
