"""Store files at an old schema version, for the migration tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dbsync.store.schema import MIGRATIONS


def schema_at(path: Path, version: int) -> sqlite3.Connection:
    """A new SQLite file at ``path`` built by the first ``version`` migrations, as a
    dbsync of that version left it (empty); an autocommit connection to fill it."""
    db = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:version]:
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute(f"PRAGMA user_version = {version}")
    return db
