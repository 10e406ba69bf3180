"""The store's schema: the tables, the migrations that built them, and why each exists.

Tables, and the invariant each one keeps::

    changes      the ingest journal: one row per accepted change, ``seq`` = the global
                 change sequence number (AUTOINCREMENT: it never restarts when a fold
                 empties the journal). Appending is the fast path, so ingest answers
                 202 once its rows are here; nothing accepted is ever lost.
    membership   per (audience key, account): ``desired`` (the CDP's word, last change
                 wins), ``delivered`` (what Demandbase acknowledged; 0 also for never
                 sent), ``seq`` of the last folded change, ``changed_at`` (when desired
                 last changed: the flush age), ``in_flight`` (the open batch carrying it)
                 and ``rejected``. The *dirty set* is ``desired <> delivered``: that, not
                 the journal, is an actor's queue, so many changes to one account cost
                 one row (invariant 3). Partial indexes cover the queue (pending: dirty,
                 not in flight, not rejected; by ``changed_at``, to plan oldest first),
                 the unsettled rows (by ``seq``, for the checkpoint) and the rejected
                 ones, so each question costs an index probe, whatever the backlog.
    backlog_counts  pending accounts per audience and direction, moved by every
                 transaction that moves an account in or out of the queue (the fold
                 from its chunk joined to the rows as they were); a test recounts
                 after each of several hundred random operations.
    batches      one import job each, and the Demandbase job id once created, so that a
                 restart resumes or re-sends what was open. An open batch's accounts
                 are the ``membership`` rows whose ``in_flight`` names it.
    audiences    the configured audiences, the list each feeds (fixed at first
                 activation: the public API cannot rename a list), state, checkpoint,
                 and when Demandbase first acknowledged one of its jobs.
    audience_keys  the integer that stands for an audience id in ``membership``
                 (migration 13): never renumbered, never deleted.
    ledger       per-audience counters (received, superseded, exported, acknowledged,
                 verified, lost...; keyed ones such as ``lost.dropped``). The sums they
                 must keep are :class:`~dbsync.model.LedgerCheck`'s.
    rejected     accounts set aside with the reason: Demandbase refused them (400), or
                 a read-back still found them wrong after the repair limit.
    reconcile_runs  one read-back each (the Data Export job, its state, the report),
                 so that a restart resumes an export instead of paying for another.
    quota_usage  calls charged per destination, endpoint and daily window; pace the
    pace         learned request rate. Both survive restarts (invariant 5).

Read-back (migration 3). Each membership row also keeps when its last batch was
acknowledged (``acked_at``: only rows acknowledged longer than the visibility lag ago
are judged), the batch of an acknowledgment no read-back has judged yet (``ack_batch``;
the verdict, verified or lost, is counted once per acknowledgment and on that batch,
whose ``throttled`` flag says whether a 429 was met while it was open: the loss rate
per thousand, throttled or not, is a sum over batches) and how many times a read-back
had it sent again (``repairs``; past the repair limit it is set aside instead).

Integer rows (migration 7). ``membership`` is a rowid table whose key, (audience,
account), is a unique index: its partial indexes point at a row by an integer, and a
new account is appended at the end of the table instead of into a random page.

No batch items (migration 11). A batch's accounts were also written to
``batch_items``, one row per account sent, kept forever and read only for open
batches, whose accounts ``membership.in_flight`` already names in the same
transactions: one B-tree insert per account planned, and a table that grew with every
send, for nothing ``membership_in_flight`` does not answer.

No awaiting index (migration 12). Acknowledgments awaiting a verdict were indexed by
(audience, batch) only so that a ledger check could count them; every acknowledgment
then wrote an index entry and every verdict deleted it, a third of a read-back's
writes, and a summary or ``ctl status`` counted every awaiting row of every audience.
A check now counts them only when it recounts (after a read-back, walking the
audience's rows); otherwise the ledger's own counters say how many await.

Integer audience keys (migration 13). ``membership`` names its audience by
``audience_key``, an integer from ``audience_keys`` (one row per audience id the store
has met: configured, appended to or snapshotted; an INTEGER PRIMARY KEY, so VACUUM
keeps it, and never deleted, so never given to another id). A string compared at
each step of every B-tree search of the key and the four partial indexes was about a
quarter of the fold's time. The journal keeps the text id (ingest appends it as
received): the fold's gather maps it to the key with a join on ``audience_keys``,
which measured no slower than a journal carrying the key (bench/README.md,
fold_floor), and gives a key to an id it meets for the first time. The other tables
keep their text ids: none is written for every account folded.

Each migration runs in its own transaction and sets ``PRAGMA user_version``; a file
newer than this code knows is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dbsync.errors import StoreError
from dbsync.model import BatchState

__all__ = ["MIGRATIONS", "OPEN_STATES_SQL", "create_temp_tables", "migrate"]

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE audiences (
        audience_id    TEXT PRIMARY KEY,
        destination    TEXT NOT NULL,
        name           TEXT NOT NULL,
        list_name      TEXT NOT NULL,
        list_id        INTEGER,
        state          TEXT NOT NULL,
        state_reason   TEXT NOT NULL DEFAULT '',
        checkpoint_seq INTEGER NOT NULL DEFAULT 0,
        folded_seq     INTEGER NOT NULL DEFAULT 0,
        updated_at     REAL NOT NULL
    );
    CREATE TABLE changes (
        seq         INTEGER PRIMARY KEY,
        audience_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        name        TEXT NOT NULL,
        domain      TEXT NOT NULL,
        member      INTEGER NOT NULL,
        ts          REAL NOT NULL
    );
    CREATE TABLE membership (
        audience_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        name        TEXT NOT NULL,
        domain      TEXT NOT NULL,
        desired     INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        changed_at  REAL NOT NULL,
        delivered   INTEGER NOT NULL DEFAULT 0,
        in_flight   INTEGER,
        rejected    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (audience_id, external_id)
    ) WITHOUT ROWID;
    CREATE INDEX membership_dirty
        ON membership (audience_id, desired, changed_at, in_flight, rejected, seq)
        WHERE desired <> delivered;
    CREATE INDEX membership_in_flight ON membership (in_flight) WHERE in_flight IS NOT NULL;
    CREATE TABLE batches (
        batch_id    INTEGER PRIMARY KEY,
        audience_id TEXT NOT NULL,
        action      TEXT NOT NULL,
        state       TEXT NOT NULL,
        job_id      INTEGER,
        rows        INTEGER NOT NULL,
        reason      TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL,
        uploaded_at REAL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX batches_open ON batches (audience_id, batch_id)
        WHERE state IN ('planned', 'created', 'uploaded');
    CREATE TABLE batch_items (
        batch_id    INTEGER NOT NULL,
        external_id TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        PRIMARY KEY (batch_id, external_id)
    ) WITHOUT ROWID;
    CREATE TABLE ledger (
        audience_id TEXT NOT NULL,
        counter     TEXT NOT NULL,
        value       INTEGER NOT NULL,
        PRIMARY KEY (audience_id, counter)
    ) WITHOUT ROWID;
    CREATE TABLE rejected (
        audience_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        name        TEXT NOT NULL,
        domain      TEXT NOT NULL,
        member      INTEGER NOT NULL,
        reason      TEXT NOT NULL,
        rejected_at REAL NOT NULL,
        attempts    INTEGER NOT NULL,
        PRIMARY KEY (audience_id, external_id)
    ) WITHOUT ROWID;
    CREATE TABLE quota_usage (
        destination TEXT NOT NULL,
        endpoint    TEXT NOT NULL,
        day_window  INTEGER NOT NULL,
        used        INTEGER NOT NULL,
        PRIMARY KEY (destination, day_window, endpoint)
    ) WITHOUT ROWID;
    CREATE TABLE pace (
        destination         TEXT PRIMARY KEY,
        requests_per_minute REAL NOT NULL,
        updated_at          REAL NOT NULL
    );
    """,
    # 2: the dirty set answers in O(log n). Version 1 counted and searched it through
    # one wide index: a backlog over 681k pending accounts took 1.9 s and every
    # checkpoint scanned it whole. Now the queue, the checkpoint and the rejected
    # accounts have an index each, the queue's size is a counter, and the journal's
    # seq can no longer restart at 1 when a fold empties it.
    """
    DROP INDEX membership_dirty;
    CREATE INDEX membership_queue ON membership (audience_id, desired, changed_at)
        WHERE desired <> delivered AND in_flight IS NULL AND rejected = 0;
    CREATE INDEX membership_unsettled ON membership (audience_id, seq)
        WHERE desired <> delivered;
    CREATE INDEX membership_rejected ON membership (audience_id, rejected)
        WHERE rejected = 1;
    CREATE TABLE backlog_counts (
        audience_id TEXT NOT NULL,
        desired     INTEGER NOT NULL,
        n           INTEGER NOT NULL,
        PRIMARY KEY (audience_id, desired)
    ) WITHOUT ROWID;
    INSERT INTO backlog_counts (audience_id, desired, n)
        SELECT audience_id, desired, COUNT(*) FROM membership
        WHERE desired <> delivered AND in_flight IS NULL AND rejected = 0
        GROUP BY audience_id, desired;
    CREATE TABLE changes_v2 (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        audience_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        name        TEXT NOT NULL,
        domain      TEXT NOT NULL,
        member      INTEGER NOT NULL,
        ts          REAL NOT NULL
    );
    INSERT INTO changes_v2 SELECT seq, audience_id, external_id, name, domain, member, ts
        FROM changes ORDER BY seq;
    DROP TABLE changes;
    ALTER TABLE changes_v2 RENAME TO changes;
    DELETE FROM sqlite_sequence WHERE name IN ('changes', 'changes_v2');
    INSERT INTO sqlite_sequence (name, seq) SELECT 'changes', MAX(
        COALESCE((SELECT MAX(seq) FROM changes), 0),
        COALESCE((SELECT MAX(seq) FROM membership), 0),
        COALESCE((SELECT MAX(folded_seq) FROM audiences), 0),
        COALESCE((SELECT MAX(seq) FROM batch_items), 0))
    """,
    # 3: read-back. Per row: when its last batch was acknowledged, the batch whose
    # acknowledgment awaits a read-back's verdict, and the repairs so far. Rows delivered
    # before this version count as acknowledged now (batch 0: none to credit), which only
    # delays their first verdict by the visibility lag. The counters they never had are
    # started so that the ledger's sums hold from the first check: what was acknowledged
    # before is "overtaken" (no read-back will judge it), earlier repairs were losses
    # "reported" by hand, earlier rejections were "refused".
    """
    ALTER TABLE membership ADD COLUMN acked_at REAL;
    ALTER TABLE membership ADD COLUMN ack_batch INTEGER;
    ALTER TABLE membership ADD COLUMN repairs INTEGER NOT NULL DEFAULT 0;
    UPDATE membership SET acked_at = CAST(strftime('%s', 'now') AS REAL), ack_batch = 0
        WHERE delivered = 1;
    CREATE INDEX membership_awaiting ON membership (audience_id, ack_batch)
        WHERE ack_batch IS NOT NULL;
    ALTER TABLE audiences ADD COLUMN first_acked_at REAL;
    UPDATE audiences SET first_acked_at = CAST(strftime('%s', 'now') AS REAL)
        WHERE audience_id IN
        (SELECT audience_id FROM ledger WHERE counter = 'acknowledged' AND value > 0);
    ALTER TABLE batches ADD COLUMN throttled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE batches ADD COLUMN verified INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE batches ADD COLUMN lost INTEGER NOT NULL DEFAULT 0;
    INSERT INTO ledger (audience_id, counter, value)
        SELECT l.audience_id, 'overtaken', l.value - (SELECT COUNT(*) FROM membership m
            WHERE m.audience_id = l.audience_id AND m.ack_batch IS NOT NULL)
        FROM ledger l WHERE l.counter = 'acknowledged';
    INSERT INTO ledger (audience_id, counter, value)
        SELECT audience_id, 'lost', value FROM ledger WHERE counter = 'repaired';
    INSERT INTO ledger (audience_id, counter, value)
        SELECT audience_id, 'lost.reported', value FROM ledger WHERE counter = 'repaired';
    INSERT INTO ledger (audience_id, counter, value)
        SELECT audience_id, 'rejected.refused', value FROM ledger WHERE counter = 'rejected';
    CREATE TABLE reconcile_runs (
        run_id        INTEGER PRIMARY KEY,
        audience_id   TEXT NOT NULL,
        list_id       INTEGER NOT NULL,
        export_job_id TEXT NOT NULL,
        started_at    REAL NOT NULL,
        state         TEXT NOT NULL,
        reason        TEXT NOT NULL DEFAULT '',
        finished_at   REAL,
        report        BLOB
    );
    CREATE INDEX reconcile_runs_audience ON reconcile_runs (audience_id, run_id);
    CREATE INDEX reconcile_runs_open ON reconcile_runs (state) WHERE state = 'exporting'
    """,
    # 4: an audience's newest finished batch, for status, without scanning them all.
    """
    CREATE INDEX batches_finished ON batches (audience_id, batch_id)
        WHERE state IN ('completed', 'failed')
    """,
    # 5: an operator's ``ctl pause`` outlives a restart or a reload that rebuilds the actor.
    """
    ALTER TABLE audiences ADD COLUMN operator_paused INTEGER NOT NULL DEFAULT 0
    """,
    # 6: a read-back judges its audience in chunks; the run keeps how far it got.
    """
    ALTER TABLE reconcile_runs ADD COLUMN judged_through TEXT;
    ALTER TABLE reconcile_runs ADD COLUMN judgment BLOB
    """,
    # 7: membership gets an integer rowid; (audience, account) stays its key, as a unique
    # index. Keyed by two strings, every partial index entry carried both and pointed at
    # a row through a string search, and an update rewrote the row in a random page of
    # the text-keyed tree: planning and completing a batch, most of the writer's time,
    # cost twice what they do through rowids (bench/README.md). Rows keep their order.
    """
    CREATE TABLE membership_v7 (
        audience_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        name        TEXT NOT NULL,
        domain      TEXT NOT NULL,
        desired     INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        changed_at  REAL NOT NULL,
        delivered   INTEGER NOT NULL DEFAULT 0,
        in_flight   INTEGER,
        rejected    INTEGER NOT NULL DEFAULT 0,
        acked_at    REAL,
        ack_batch   INTEGER,
        repairs     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (audience_id, external_id)
    );
    INSERT INTO membership_v7 (audience_id, external_id, name, domain, desired, seq,
        changed_at, delivered, in_flight, rejected, acked_at, ack_batch, repairs)
        SELECT audience_id, external_id, name, domain, desired, seq, changed_at, delivered,
        in_flight, rejected, acked_at, ack_batch, repairs FROM membership
        ORDER BY audience_id, external_id;
    DROP TABLE membership;
    ALTER TABLE membership_v7 RENAME TO membership;
    CREATE INDEX membership_in_flight ON membership (in_flight) WHERE in_flight IS NOT NULL;
    CREATE INDEX membership_queue ON membership (audience_id, desired, changed_at)
        WHERE desired <> delivered AND in_flight IS NULL AND rejected = 0;
    CREATE INDEX membership_unsettled ON membership (audience_id, seq)
        WHERE desired <> delivered;
    CREATE INDEX membership_rejected ON membership (audience_id, rejected)
        WHERE rejected = 1;
    CREATE INDEX membership_awaiting ON membership (audience_id, ack_batch)
        WHERE ack_batch IS NOT NULL
    """,
    # 8: complete memberships staged, judged by the removal guard and applied in the
    # store (PUT snapshots and AEP file runs), and the AEP file runs decided. A snapshot
    # is staged a chunk at a time in ``snapshot_rows`` (one row per account, duplicates
    # and conflicting rows counted), so that neither its parse nor its difference from
    # desired state holds a whole membership in Python; one held by the guard waits
    # there for ``ctl approve`` or ``ctl discard``.
    """
    CREATE TABLE snapshots (
        snapshot_id INTEGER PRIMARY KEY,
        audience_id TEXT NOT NULL,
        source      TEXT NOT NULL,
        mode        TEXT NOT NULL,
        state       TEXT NOT NULL,
        reason      TEXT NOT NULL DEFAULT '',
        received_at REAL NOT NULL,
        members     INTEGER NOT NULL DEFAULT 0,
        current     INTEGER NOT NULL DEFAULT 0,
        added       INTEGER NOT NULL DEFAULT 0,
        removed     INTEGER NOT NULL DEFAULT 0,
        decided_at  REAL
    );
    CREATE INDEX snapshots_open ON snapshots (audience_id, state)
        WHERE state IN ('staging', 'held');
    CREATE TABLE snapshot_rows (
        snapshot_id  INTEGER NOT NULL,
        external_id  TEXT NOT NULL,
        name         TEXT NOT NULL,
        domain       TEXT NOT NULL,
        member       INTEGER NOT NULL,
        qualified_at REAL,
        n            INTEGER NOT NULL,
        conflict     INTEGER NOT NULL,
        PRIMARY KEY (snapshot_id, external_id)
    ) WITHOUT ROWID;
    CREATE TABLE file_runs (
        run_id        INTEGER PRIMARY KEY,
        audience_id   TEXT NOT NULL,
        run_key       TEXT NOT NULL,
        run_time      REAL NOT NULL,
        content_hash  TEXT NOT NULL,
        files         TEXT NOT NULL,
        outcome       TEXT NOT NULL,
        reason        TEXT NOT NULL DEFAULT '',
        snapshot_id   INTEGER,
        rows          INTEGER NOT NULL DEFAULT 0,
        invalid       INTEGER NOT NULL DEFAULT 0,
        duplicates    INTEGER NOT NULL DEFAULT 0,
        conflicts     INTEGER NOT NULL DEFAULT 0,
        added         INTEGER NOT NULL DEFAULT 0,
        removed       INTEGER NOT NULL DEFAULT 0,
        decided_at    REAL NOT NULL,
        files_deleted INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX file_runs_audience ON file_runs (audience_id, outcome, run_time);
    CREATE INDEX file_runs_hash ON file_runs (audience_id, content_hash);
    CREATE INDEX file_runs_snapshot ON file_runs (snapshot_id) WHERE snapshot_id IS NOT NULL
    """,
    # 9: an account set aside as unmatched is tried again on a slow schedule (Demandbase's
    # database grows; a throttled row can look unmatched); ``retries`` counts the tries.
    """
    ALTER TABLE rejected ADD COLUMN retries INTEGER NOT NULL DEFAULT 0
    """,
    # 10: adopting a list that already exists: read back before the first send, the
    # listed members are taken as delivered. One row per audience asked to (pending
    # while ``adopted_at`` is NULL), kept afterwards so that a first start adopts once.
    """
    CREATE TABLE adoptions (
        audience_id  TEXT PRIMARY KEY,
        requested_at REAL NOT NULL,
        adopted_at   REAL,
        listed       INTEGER NOT NULL DEFAULT 0,
        adopted      INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID
    """,
    # 11: batch_items goes. Every open batch's accounts are the rows whose in_flight is
    # that batch (planning, splitting, renewing and closing a batch move both in one
    # transaction); the items of closed batches were never read.
    """
    DROP TABLE batch_items
    """,
    # 12: the awaiting index goes (the module docstring says why).
    """
    DROP INDEX membership_awaiting
    """,
    # 13: membership is keyed by an integer audience key instead of the audience's text
    # id, in every index. Each entry of the key index and the four partial ones carried
    # the id as a string and compared it at each step of every search: the fold's own
    # statements ran 1.35-1.42 times as fast into integer keys (bench/README.md,
    # fold_floor), the store's fold ~1.3 times (store_upsert). The key is
    # ``audience_keys.audience_key``, an INTEGER PRIMARY KEY (VACUUM keeps its values),
    # given to every id the store meets and never deleted. Rows keep their rowids.
    """
    CREATE TABLE audience_keys (
        audience_key INTEGER PRIMARY KEY,
        audience_id  TEXT NOT NULL UNIQUE
    );
    INSERT INTO audience_keys (audience_id)
        SELECT audience_id FROM audiences UNION SELECT audience_id FROM membership
        UNION SELECT audience_id FROM changes ORDER BY 1;
    CREATE TABLE membership_v13 (
        audience_key INTEGER NOT NULL,
        external_id  TEXT NOT NULL,
        name         TEXT NOT NULL,
        domain       TEXT NOT NULL,
        desired      INTEGER NOT NULL,
        seq          INTEGER NOT NULL,
        changed_at   REAL NOT NULL,
        delivered    INTEGER NOT NULL DEFAULT 0,
        in_flight    INTEGER,
        rejected     INTEGER NOT NULL DEFAULT 0,
        acked_at     REAL,
        ack_batch    INTEGER,
        repairs      INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (audience_key, external_id)
    );
    INSERT INTO membership_v13 (rowid, audience_key, external_id, name, domain, desired,
        seq, changed_at, delivered, in_flight, rejected, acked_at, ack_batch, repairs)
        SELECT m.rowid, k.audience_key, m.external_id, m.name, m.domain, m.desired, m.seq,
        m.changed_at, m.delivered, m.in_flight, m.rejected, m.acked_at, m.ack_batch,
        m.repairs FROM membership m CROSS JOIN audience_keys k USING (audience_id)
        ORDER BY m.rowid;
    DROP TABLE membership;
    ALTER TABLE membership_v13 RENAME TO membership;
    CREATE INDEX membership_in_flight ON membership (in_flight) WHERE in_flight IS NOT NULL;
    CREATE INDEX membership_queue ON membership (audience_key, desired, changed_at)
        WHERE desired <> delivered AND in_flight IS NULL AND rejected = 0;
    CREATE INDEX membership_unsettled ON membership (audience_key, seq)
        WHERE desired <> delivered;
    CREATE INDEX membership_rejected ON membership (audience_key, rejected)
        WHERE rejected = 1
    """,
)


# Where the fold gathers a chunk: the last change per account, and how many changes
# the account had in the chunk (``n``). Writer connection only.
_FOLD_CHUNK_TABLE = (
    "CREATE TEMP TABLE fold_chunk ("
    " audience_key INTEGER NOT NULL, external_id TEXT NOT NULL, name TEXT NOT NULL,"
    " domain TEXT NOT NULL, member INTEGER NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,"
    " n INTEGER NOT NULL, PRIMARY KEY (audience_key, external_id)) WITHOUT ROWID"
)


# The external ids of each list a read-back is judging (or, when some are not ours, the
# accounts they matched), for the chunks' SQL to probe. Writer connection only.
_READBACK_LISTED_TABLE = (
    "CREATE TEMP TABLE readback_listed (run_id INTEGER NOT NULL, external_id TEXT NOT NULL,"
    " PRIMARY KEY (run_id, external_id)) WITHOUT ROWID"
)

# The plain accounts of the chunk a read-back is judging (see dbsync.judgment), keyed
# so that counting them by (desired, batch) walks the key instead of sorting: ``batch``
# is the acknowledgment awaiting a verdict, -1 for none (batch ids are never negative).
_READBACK_PLAIN_TABLE = (
    "CREATE TEMP TABLE readback_plain (desired INTEGER NOT NULL, batch INTEGER NOT NULL,"
    " row INTEGER NOT NULL, repairs INTEGER NOT NULL, PRIMARY KEY (desired, batch, row))"
    " WITHOUT ROWID"
)


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the file to the newest schema, one transaction per migration."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"{path} has schema version {version}, newer than this dbsync "
            f"knows ({len(MIGRATIONS)}); run a newer dbsync"
        )
    for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already
                db.execute("ROLLBACK")
            raise


def create_temp_tables(db: sqlite3.Connection) -> None:
    """The writer connection's scratch tables (in memory, gone with the connection)."""
    db.execute(_FOLD_CHUNK_TABLE)
    db.execute(_READBACK_LISTED_TABLE)
    db.execute(_READBACK_PLAIN_TABLE)


# The open batch states, literal in the SQL (not bound) so that SQLite can use the
# partial index on them (``batches_open``).
OPEN_STATES_SQL = "(" + ", ".join(f"'{s.value}'" for s in BatchState if s.is_open) + ")"
