"""What plain SQLite folds on this machine, by the shape of the table folded into.

The fold (``dbsync.store.journal.fold_chunk``) spends most of its time upserting into
``membership``, whose every new account is an entry in four B-trees. This script
folds the same journal, with the fold's own statements (a chunk deduplicated in a
sorted temporary table, then one sorted upsert, then the chunk deleted from the
journal; one transaction per chunk) and the store's page size and cache, into
membership tables of several shapes, beside the raw keyed upsert of the same rows
(``bench.store_upsert``'s baseline), all in one run:

* ``store``: membership as the store has it (integer audience key, from the
  journal's text id by the gather's join; rowid table, key index, and the queue,
  unsettled, in-flight and rejected indexes);
* ``store_int_journal``: the same with the key in the journal (no join);
* ``store_text_audience``: membership as it was before (schema version 12): the
  text audience id in the table, its indexes and the fold's chunk;
* ``key_only`` and ``int_key_only``: the key index alone (the partial indexes that
  stay empty for new accounts kept), text and integer audience;
* ``bare``: the fold the issue quotes, one ``INSERT ... SELECT ... ORDER BY key ...
  ON CONFLICT DO UPDATE`` from the journal into a ``WITHOUT ROWID`` table keyed by
  (audience, account) and nothing else.

It bounds what a change of schema can buy before writing one: the gap between
``store`` and a shape is what dropping what that shape lacks would save.

    python -m bench.fold_floor [--rows 1000000] [--keys 3000000] [--quick]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from bench._common import emit, say
from bench.store_upsert import make_rows, measure_raw_upsert
from dbsync.store.engine import PAGE_BYTES, WRITER_CACHE_KIB
from dbsync.store.journal import FOLD_CHUNK_ROWS, GATHER_CHUNK, UPSERT_CHUNK

_COLUMNS = (
    "external_id TEXT NOT NULL, name TEXT NOT NULL, domain TEXT NOT NULL,"
    " desired INTEGER NOT NULL, seq INTEGER NOT NULL, changed_at REAL NOT NULL,"
    " delivered INTEGER NOT NULL DEFAULT 0, in_flight INTEGER,"
    " rejected INTEGER NOT NULL DEFAULT 0, acked_at REAL, ack_batch INTEGER,"
    " repairs INTEGER NOT NULL DEFAULT 0, PRIMARY KEY ({a}, external_id)"
)
_EMPTY_FOR_NEW = (
    "CREATE INDEX m_in_flight ON membership (in_flight) WHERE in_flight IS NOT NULL;"
    "CREATE INDEX m_rejected ON membership ({a}, rejected) WHERE rejected = 1"
)
_DIRTY_SET = (
    "CREATE INDEX m_queue ON membership ({a}, desired, changed_at)"
    " WHERE desired <> delivered AND in_flight IS NULL AND rejected = 0;"
    "CREATE INDEX m_unsettled ON membership ({a}, seq) WHERE desired <> delivered"
)
_STORE_INDEXES = f"{_EMPTY_FOR_NEW};{_DIRTY_SET}"

# The store's gather maps the journal's text id to the key with a join; without it,
# the statements read the journal's own audience column (text, or the key itself).
_KEY_JOIN = " CROSS JOIN audience_keys k ON k.audience_id = c.audience_id"
assert _KEY_JOIN in GATHER_CHUNK
assert "k.audience_key" in GATHER_CHUNK
_GATHER_UNMAPPED = GATHER_CHUNK.replace(_KEY_JOIN, "").replace("k.audience_key", "c.audience_id")
# Version 12's statements: membership and the chunk keyed by the text audience id.
_GATHER_TEXT = _GATHER_UNMAPPED.replace("audience_key", "audience_id")
_UPSERT_TEXT = UPSERT_CHUNK.replace("audience_key", "audience_id")
assert "audience_key" not in _GATHER_TEXT + _UPSERT_TEXT


class Shape(NamedTuple):
    """A membership table and the fold's statements into it."""

    journal: str  # the type of the journal's audience column
    key: str  # membership's audience column: audience_key (INTEGER) or audience_id (TEXT)
    indexes: str  # beside the key, with {a} for the audience column
    gather: str
    upsert: str


SHAPES = {
    # As the store has it (migration 13): text journal, mapped to the key in the gather.
    "store": Shape("TEXT", "audience_key", _STORE_INDEXES, GATHER_CHUNK, UPSERT_CHUNK),
    # The same with the key in the journal (ingest would map id -> key on append).
    "store_int_journal": Shape(
        "INTEGER", "audience_key", _STORE_INDEXES, _GATHER_UNMAPPED, UPSERT_CHUNK
    ),
    # As it was before (schema version 12): text audience ids everywhere.
    "store_text_audience": Shape("TEXT", "audience_id", _STORE_INDEXES, _GATHER_TEXT, _UPSERT_TEXT),
    "key_only": Shape("TEXT", "audience_id", _EMPTY_FOR_NEW, _GATHER_TEXT, _UPSERT_TEXT),
    "int_key_only": Shape("TEXT", "audience_key", _EMPTY_FOR_NEW, GATHER_CHUNK, UPSERT_CHUNK),
}


def open_with_journal(path: Path, audience_type: str, rows: list[tuple]) -> sqlite3.Connection:
    """A new file with the store's pragmas, ``rows`` in its journal (their audience as
    its key, 1, if ``audience_type`` is INTEGER) and the audience's key."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA page_size = {PAGE_BYTES}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA temp_store = MEMORY")
    db.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
    db.execute(
        "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        f" audience_id {audience_type} NOT NULL, external_id TEXT NOT NULL,"
        " name TEXT NOT NULL, domain TEXT NOT NULL, member INTEGER NOT NULL, ts REAL NOT NULL)"
    )
    db.execute(
        "CREATE TABLE audience_keys (audience_key INTEGER PRIMARY KEY,"
        " audience_id TEXT NOT NULL UNIQUE)"
    )
    db.execute("INSERT INTO audience_keys VALUES (1, ?)", (rows[0][0],))
    audience = 1 if audience_type == "INTEGER" else rows[0][0]
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO changes (audience_id, external_id, name, domain, member, ts)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(audience, *row[1:]) for row in rows],
    )
    db.execute("COMMIT")
    return db


def fold_in_chunks(
    db: sqlite3.Connection, rows: int, fold: Callable[[tuple[int, int]], object]
) -> float:
    """Rows/s of folding the journal a chunk at a time: ``fold`` of the chunk's first
    and last seq, then the chunk deleted from the journal, in one transaction."""
    started = time.perf_counter()
    for first in range(1, rows + 1, FOLD_CHUNK_ROWS):
        chunk = (first, first + FOLD_CHUNK_ROWS - 1)
        db.execute("BEGIN IMMEDIATE")
        fold(chunk)
        db.execute("DELETE FROM changes WHERE seq BETWEEN ? AND ?", chunk)
        db.execute("COMMIT")
    return rows / (time.perf_counter() - started)


def fold_shape(path: Path, rows: list[tuple], shape: Shape) -> float:
    """Rows/s folded into membership of this shape with its fold statements."""
    db = open_with_journal(path, shape.journal, rows)
    try:
        key_type = "INTEGER" if shape.key == "audience_key" else "TEXT"
        columns = _COLUMNS.format(a=shape.key)
        db.execute(f"CREATE TABLE membership ({shape.key} {key_type} NOT NULL, {columns})")
        for statement in shape.indexes.format(a=shape.key).split(";"):
            db.execute(statement)
        db.execute(
            f"CREATE TEMP TABLE fold_chunk ({shape.key} {key_type} NOT NULL,"
            " external_id TEXT NOT NULL, name TEXT NOT NULL, domain TEXT NOT NULL,"
            " member INTEGER NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,"
            f" n INTEGER NOT NULL, PRIMARY KEY ({shape.key}, external_id)) WITHOUT ROWID"
        )

        def fold(chunk: tuple[int, int]) -> None:
            db.execute("DELETE FROM temp.fold_chunk")
            db.execute(shape.gather, chunk)
            db.execute(shape.upsert)

        return fold_in_chunks(db, len(rows), fold)
    finally:
        db.close()


def fold_bare(path: Path, rows: list[tuple]) -> float:
    """Rows/s of the issue's fold: one sorted upsert per chunk into one B-tree."""
    db = open_with_journal(path, "TEXT", rows)
    try:
        db.execute(
            "CREATE TABLE membership (audience_id TEXT NOT NULL, external_id TEXT NOT NULL,"
            " name TEXT NOT NULL, domain TEXT NOT NULL, member INTEGER NOT NULL,"
            " seq INTEGER NOT NULL, ts REAL NOT NULL, PRIMARY KEY (audience_id, external_id))"
            " WITHOUT ROWID"
        )
        upsert = (
            "INSERT INTO membership SELECT audience_id, external_id, name, domain, member,"
            " seq, ts FROM changes WHERE seq BETWEEN ? AND ?"
            " ORDER BY audience_id, external_id, seq ON CONFLICT DO UPDATE SET"
            " name = excluded.name, domain = excluded.domain, member = excluded.member,"
            " seq = excluded.seq, ts = excluded.ts"
        )
        return fold_in_chunks(db, len(rows), lambda chunk: db.execute(upsert, chunk))
    finally:
        db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=3_000_000)
    parser.add_argument("--quick", action="store_true", help="20,000 rows over 60,000 keys")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.keys = 20_000, 60_000
    rows = make_rows(args.rows, args.keys, seed=1)
    say(f"{args.rows:,} changes over {args.keys:,} keys, chunks of {FOLD_CHUNK_ROWS:,}")
    figures: dict[str, object] = {"rows": args.rows, "keys": args.keys}
    with tempfile.TemporaryDirectory(prefix="dbsync-bench-") as tmp:
        raw = measure_raw_upsert(rows, Path(tmp) / "raw.sqlite3")
        say(f"raw sqlite3 upsert       {raw:>10,.0f} rows/s")
        figures["raw_upsert_rows_per_second"] = round(raw)
        rates = {
            name: fold_shape(Path(tmp) / f"{name}.sqlite3", rows, shape)
            for name, shape in SHAPES.items()
        }
        rates["bare"] = fold_bare(Path(tmp) / "bare.sqlite3", rows)
    for name, rate in rates.items():
        say(f"fold into {name:<18} {rate:>10,.0f} rows/s ({rate / raw:.2f}x raw upsert)")
        figures[f"{name}_rows_per_second"] = round(rate)
        figures[f"{name}_ratio_to_raw"] = round(rate / raw, 2)
    return emit("fold_floor", figures)


if __name__ == "__main__":
    raise SystemExit(main())
