"""The configured audiences: what each feeds, its state, and an operator's pause; and
the integer key that stands for an audience id in ``membership`` (schema migration 13).

Nothing is ever deleted: an audience gone from the configuration is *deactivated*
(its list is left as it is) and comes back with its history if it returns. The list
an audience feeds is fixed at its first activation, since the public API cannot
rename a list.

Every audience id the store meets gets a key in ``audience_keys``: a configured one
when it is added, any other the first time the fold meets its changes (ingest appends
the id as received, so a change of an audience configured a moment ago is accepted as
before). Statements on ``membership`` bind the id and resolve it in SQL (:data:`KEY`,
one probe of a small index per statement); a key is never renumbered or deleted.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from dbsync.model import AudienceRecord, AudienceSpec, AudienceState, SyncResult
from dbsync.store.engine import Engine

__all__ = [
    "KEY",
    "audiences",
    "give_key",
    "key_of",
    "ping",
    "set_audience_state",
    "set_operator_paused",
    "sync_audiences",
]


def key_of(param: str) -> str:
    """SQL for the key of the audience id bound at ``param`` (``?``, ``?1``, ``:a`` or a
    column). NULL for an id the store never met: no membership row matches it, as none
    would have matched the id."""
    return f"(SELECT audience_key FROM audience_keys WHERE audience_id = {param})"


# The key of the audience id bound at the next ``?``: what statements on membership bind.
KEY = key_of("?")


def give_key(db: sqlite3.Connection, audience_id: str) -> int:
    """The audience's key, given now if the store never met the id (writer only)."""
    found = db.execute(
        "SELECT audience_key FROM audience_keys WHERE audience_id = ?", (audience_id,)
    ).fetchone()
    if found is not None:
        return int(found[0])
    key = db.execute("INSERT INTO audience_keys (audience_id) VALUES (?)", (audience_id,)).lastrowid
    assert key is not None
    return key


async def sync_audiences(engine: Engine, specs: Sequence[AudienceSpec]) -> SyncResult:
    """Make the stored audiences match the configuration; nothing is ever deleted."""
    now = engine.now()

    def work(db: sqlite3.Connection) -> SyncResult:
        known = {
            row[0]: row for row in db.execute("SELECT audience_id, name, state FROM audiences")
        }
        added, renamed, reactivated = [], [], []
        for spec in specs:
            row = known.get(spec.audience_id)
            if row is None:
                db.execute(
                    "INSERT INTO audiences (audience_id, destination, name, list_name,"
                    " list_id, state, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        spec.audience_id,
                        spec.destination,
                        spec.name,
                        spec.list_name,
                        spec.list_id,
                        AudienceState.ACTIVE,
                        now,
                    ),
                )
                give_key(db, spec.audience_id)
                added.append(spec.audience_id)
                continue
            _, old_name, state = row
            if old_name != spec.name:
                renamed.append((spec.audience_id, old_name, spec.name))
            if state == AudienceState.DEACTIVATED:
                reactivated.append(spec.audience_id)
                state = AudienceState.ACTIVE
            # Only a row that changes is written: a start with the same configuration
            # writes nothing, so that a daemon started on a full disk comes up (and
            # waits for space) instead of failing here and restarting in a loop.
            db.execute(
                "UPDATE audiences SET destination = ?, name = ?, state = ?,"
                " list_id = COALESCE(list_id, ?), updated_at = ? WHERE audience_id = ?"
                " AND (destination IS NOT ? OR name IS NOT ? OR state IS NOT ?"
                " OR (list_id IS NULL AND ? IS NOT NULL))",
                (
                    *(spec.destination, spec.name, state, spec.list_id, now, spec.audience_id),
                    *(spec.destination, spec.name, state, spec.list_id),
                ),
            )
        wanted = {spec.audience_id for spec in specs}
        deactivated = [
            audience_id
            for audience_id, row in known.items()
            if audience_id not in wanted and row[2] != AudienceState.DEACTIVATED
        ]
        db.executemany(
            "UPDATE audiences SET state = ?, updated_at = ? WHERE audience_id = ?",
            [(AudienceState.DEACTIVATED, now, a) for a in deactivated],
        )
        return SyncResult(
            added=added, renamed=renamed, deactivated=deactivated, reactivated=reactivated
        )

    return await engine.transaction(work)


_RECORD_COLUMNS = (
    "audience_id, destination, name, list_name, list_id, state, state_reason,"
    " checkpoint_seq, updated_at, operator_paused"
)


def _record(row: Sequence[Any]) -> AudienceRecord:
    return AudienceRecord(
        audience_id=row[0],
        destination=row[1],
        name=row[2],
        list_name=row[3],
        list_id=row[4],
        state=AudienceState(row[5]),
        state_reason=row[6],
        checkpoint_seq=row[7],
        updated_at=row[8],
        operator_paused=bool(row[9]),
    )


async def audiences(engine: Engine) -> dict[str, AudienceRecord]:
    rows = await engine.read(f"SELECT {_RECORD_COLUMNS} FROM audiences ORDER BY audience_id")
    return {row[0]: _record(row) for row in rows}


async def audience(engine: Engine, audience_id: str) -> AudienceRecord | None:
    """One audience's record: what an actor reads when it starts (not the whole table,
    which 10,000 starting actors would each read)."""
    rows = await engine.read(
        f"SELECT {_RECORD_COLUMNS} FROM audiences WHERE audience_id = ?", (audience_id,)
    )
    return _record(rows[0]) if rows else None


async def set_audience_state(
    engine: Engine, audience_id: str, state: AudienceState, reason: str = ""
) -> None:
    now = engine.now()
    await engine.transaction(
        lambda db: db.execute(
            "UPDATE audiences SET state = ?, state_reason = ?, updated_at = ?"
            " WHERE audience_id = ?",
            (state, reason, now, audience_id),
        )
    )


async def set_operator_paused(engine: Engine, audience_id: str, paused: bool) -> None:
    """Remember an operator's pause (or its end) across restarts and reloads."""
    await engine.transaction(
        lambda db: db.execute(
            "UPDATE audiences SET operator_paused = ? WHERE audience_id = ?",
            (int(paused), audience_id),
        )
    )


async def ping(engine: Engine) -> None:
    """Read one row of the file: raises StoreError if the store cannot be read."""
    await engine.read("SELECT 1 FROM audiences LIMIT 1")
