"""Request bodies decoded into changes and accounts, or a rejection that names the field.

Three encodings arrive: NDJSON (one object a line), JSON (an array of objects, or one
object) and, for snapshots, CSV. Everything is validated before anything is returned,
so that a request is applied whole or not at all.

NDJSON is the bulk path, and its cost is per row, so it is decoded in chunks of
:data:`CHUNK_BYTES` of whole lines: each chunk's lines are joined into one JSON array and
decoded by one typed msgspec call (three times faster than a call per line, and far
faster than one call for the whole body, which spends its time in the garbage
collector), and the event loop gets a turn between chunks, so that decoding a 64 MiB
body never holds it for more than a few milliseconds at a time. msgspec holds the GIL
while it decodes, so a worker thread would block the loop just the same. Only when a chunk
fails is it decoded line by line, to name the line at fault. A JSON array is decoded
in one call: bulk senders should use NDJSON.

Field names in rejections: ``line 17: account.external_id`` (NDJSON, lines counted
from 1), ``[3].member`` (JSON array, items counted from 0), ``ts`` (one object),
``row 5: External Account ID`` (CSV, data rows counted from 1 after the header).
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import math
import re
from collections.abc import AsyncIterator, Iterator, Sequence, Set
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, get_args

import msgspec

from dbsync import validation
from dbsync.demandbase.csvfile import read_rows
from dbsync.demandbase.wire import IMPORT_COLUMNS, import_row_problem
from dbsync.model import Account, AccountKey, Change

__all__ = [
    "CHUNK_BYTES",
    "TS_AHEAD_SECONDS",
    "TS_EARLIEST",
    "ChangeIn",
    "Items",
    "Rejected",
    "check_account",
    "decode_json",
    "decode_ndjson",
    "distinct_accounts",
    "epoch_seconds",
    "received_ts",
    "snapshot_accounts",
    "snapshot_chunks",
    "to_changes",
]

T = TypeVar("T")

CHUNK_BYTES = 1024 * 1024
_FIRST_BYTE = re.compile(rb"[ \t\r\n]*(\S)")
"""NDJSON decoded per call (whole lines): about 8,000 changes, a few milliseconds."""

ROWS_PER_TURN = 8192
"""CSV rows read between two turns given to the event loop."""

MILLISECONDS_FROM = 1e11
"""Epoch numbers at least this large are milliseconds: as seconds they would be past
the year 5000, as milliseconds they are after March 1973."""

KEY_MAX_LENGTH: int = get_args(AccountKey)[1].max_length
"""The longest external account id the model allows."""

TS_EARLIEST = 946_684_800.0
"""2000-01-01T00:00:00Z: the earliest ``ts`` accepted. No CDP decided an account
audience before then; an earlier time is an unset date (0, 1970, year 1) or a unit
mistake, and is refused rather than guessed at."""

TS_AHEAD_SECONDS = 86_400.0
"""How far past the receiving clock a ``ts`` may be: a day covers any clock skew and a
time zone written as UTC; further is a unit mistake (milliseconds read as seconds)."""

_NAME_COLUMN, _DOMAIN_COLUMN, _ID_COLUMN = IMPORT_COLUMNS
_ACCOUNT_FIELDS = {_NAME_COLUMN: "name", _DOMAIN_COLUMN: "domain", _ID_COLUMN: "external_id"}


class Rejected(Exception):
    """A request refused with ``status``; ``field`` says where, for the sender to fix."""

    def __init__(
        self,
        status: int,
        error: str,
        field: str | None = None,
        *,
        retry_after_seconds: int | None = None,
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field
        self.retry_after_seconds = retry_after_seconds


class ChangeIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """A native change as sent: ``ts`` is optional and may be a number or ISO 8601."""

    audience_id: str
    account: Account
    member: bool
    ts: float | str | None = None


@dataclass(frozen=True, slots=True)
class Items(Generic[T]):
    """Decoded items and where each came from, so that later checks can name it too.

    ``positions`` are line numbers (``kind="line"``) or array indices (``"index"``);
    ``"single"`` is a body that was one object.
    """

    items: list[T]
    positions: Sequence[int]
    kind: Literal["line", "index", "single"]

    def field(self, i: int, name: str = "") -> str:
        if self.kind == "line":
            return f"line {self.positions[i]}: {name}" if name else f"line {self.positions[i]}"
        if self.kind == "index":
            return f"[{self.positions[i]}].{name}" if name else f"[{self.positions[i]}]"
        return name or "body"


# --- JSON and NDJSON -----------------------------------------------------------------

_DECODERS: dict[Any, tuple[Any, Any]] = {}


def _decoders(item: type[T]) -> tuple[msgspec.json.Decoder[list[T]], msgspec.json.Decoder[T]]:
    """Decoders of one ``item`` and of an array of them, made once per type."""
    found = _DECODERS.get(item)
    if found is None:
        many = msgspec.json.Decoder(list[item])  # type: ignore[valid-type]
        found = _DECODERS[item] = (many, msgspec.json.Decoder(item))
    return found


def _explain(exc: msgspec.DecodeError) -> tuple[str, str]:
    """msgspec's message without its path, and the path (``[3].account.external_id``)."""
    error, path = validation.split(exc)
    if name := validation.missing_field(error) or validation.unknown_field(error):
        path = f"{path}.{name}" if path else name
    if not isinstance(exc, msgspec.ValidationError):
        error = f"malformed JSON: {error}"
    return error, path


def decode_json(body: bytes | bytearray, item: type[T]) -> Items[T]:
    """A JSON array of ``item`` objects, or one such object."""
    first = _FIRST_BYTE.match(body)  # not lstrip(): a copy of the whole body
    start = first.group(1) if first is not None else b""
    if not start:
        raise Rejected(400, "empty body", "body")
    many, one = _decoders(item)
    try:
        if start == b"[":
            items: list[T] = many.decode(body)
            return Items(items, range(len(items)), "index")
        return Items([one.decode(body)], range(1), "single")
    except msgspec.DecodeError as exc:
        error, path = _explain(exc)
        raise Rejected(400, error, path or "body") from None


async def decode_ndjson(body: bytes | bytearray, item: type[T]) -> AsyncIterator[Items[T]]:
    """``item`` objects one a line, in chunks; blank lines are skipped.

    Raises :class:`Rejected` naming the first bad line, or for a body with no line.
    """
    many, one = _decoders(item)
    empty = True
    start = 0  # lines before this chunk
    offset = 0
    while offset < len(body):
        # About CHUNK_BYTES, up to the end of a line: even splitting the whole body at
        # once would hold the loop for tens of milliseconds at 64 MiB.
        end = body.find(b"\n", offset + CHUNK_BYTES)
        end = len(body) if end < 0 else end + 1
        chunk = bytes(body[offset:end]).split(b"\n")
        offset = end
        if chunk[-1] == b"":
            chunk.pop()  # what follows the chunk's last line break
        try:
            items: list[T] | None = many.decode(b"[" + b",".join(chunk) + b"]")
        except msgspec.DecodeError:
            items = None
        # A count that differs means a line held two objects ("{...},{...}"): only the
        # slow path can tell which line.
        if items is not None and len(items) == len(chunk):
            batch = Items(items, range(start + 1, start + 1 + len(chunk)), "line")
        else:
            batch = _lines_one_by_one(chunk, start, one)
        start += len(chunk)
        if batch.items:
            empty = False
            yield batch
        await asyncio.sleep(0)
    if empty:
        raise Rejected(400, "empty body", "body")


def _lines_one_by_one(chunk: list[bytes], start: int, one: msgspec.json.Decoder[T]) -> Items[T]:
    items: list[T] = []
    positions: list[int] = []
    for offset, line in enumerate(chunk):
        if not line.strip():
            continue
        number = start + offset + 1
        try:
            items.append(one.decode(line))
        except msgspec.DecodeError as exc:
            error, path = _explain(exc)
            raise Rejected(
                400, error, f"line {number}: {path}" if path else f"line {number}"
            ) from None
        positions.append(number)
    return Items(items, positions, "line")


# --- time ------------------------------------------------------------------------------


def epoch_seconds(value: object) -> float:
    """Seconds since the epoch from a number (seconds or milliseconds) or ISO 8601 text.

    ISO 8601 with or without fractional seconds, with ``Z``, ``+00:00`` or ``+0000``;
    without an offset it is UTC. Raises ``ValueError`` saying what was wrong.
    """
    if isinstance(value, bool):
        raise ValueError("a timestamp must be a number or an ISO 8601 string, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"{value!r} is not a time since the epoch")
        return seconds / 1000 if seconds >= MILLISECONDS_FROM else seconds
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 timestamp") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.timestamp()
    raise ValueError("a timestamp must be a number or an ISO 8601 string")


def received_ts(value: object, now: float) -> float:
    """Check a sent ``ts`` (or AEP ``lastQualificationTime``) and return the time to record.

    One rule for every form (number of seconds or milliseconds, ISO 8601 text; JSON,
    NDJSON, AEP): the time must lie between :data:`TS_EARLIEST` and ``now`` plus
    :data:`TS_AHEAD_SECONDS`, else ``ValueError`` saying so. ``None`` (absent) is fine.

    What is recorded is ``now``, the time dbsync received the change, whatever was
    sent: the store queues accounts and audiences oldest first by this time, and a
    sender's clock must not move an audience ahead of changes that have waited longer
    in dbsync (a ``ts`` of 2001 would otherwise put its audience first at once). The
    order of a key's changes is the order they arrived in, never their ``ts``.
    """
    if value is None:
        return now
    seconds = epoch_seconds(value)
    if not TS_EARLIEST <= seconds <= now + TS_AHEAD_SECONDS:
        raise ValueError(
            f"{value!r} is outside the accepted range: from 2000-01-01T00:00:00Z to a day after now"
        )
    return now


def check_account(account: Account) -> tuple[str, str] | None:
    """(field, problem) when Demandbase would refuse ``account``'s import row, else None.

    :func:`~dbsync.demandbase.wire.import_row_problem` is the rule; this names the
    field as a JSON sender wrote it (``name``, ``domain``, ``external_id``).
    """
    problem = import_row_problem(account.name, account.domain, account.external_id)
    if problem is None:
        return None
    column, detail = problem
    return _ACCOUNT_FIELDS[column], detail


# --- native changes ------------------------------------------------------------------


def to_changes(batch: Items[ChangeIn], active: Set[str], now: float) -> list[Change]:
    """Changes with their audience (404), account and ``ts`` (400) checked."""
    changes: list[Change] = []
    append = changes.append
    for i, item in enumerate(batch.items):
        if item.audience_id not in active:
            raise Rejected(
                404,
                f"audience {item.audience_id!r} is not activated",
                batch.field(i, "audience_id"),
            )
        account = item.account
        if problem := check_account(account):
            field, detail = problem
            raise Rejected(400, f"{field} {detail}", batch.field(i, f"account.{field}"))
        ts = item.ts
        if ts is not None:
            try:
                received_ts(ts, now)
            except ValueError as exc:
                raise Rejected(400, str(exc), batch.field(i, "ts")) from None
        append(Change(audience_id=item.audience_id, account=account, member=item.member, ts=now))
    return changes


# --- snapshots -----------------------------------------------------------------------


# Accounts per chunk a snapshot is staged in: the store writes each in a transaction
# of its own, so a chunk bounds both the memory a snapshot holds and how long it keeps
# ingest's commits waiting.
SNAPSHOT_CHUNK_ROWS = 50_000


async def snapshot_accounts(body: bytes, media: Literal["csv", "ndjson", "json"]) -> list[Account]:
    """An audience's complete membership as sent, duplicates included."""
    accounts: list[Account] = []
    async for chunk in snapshot_chunks(body, media):
        accounts.extend(chunk)
    return accounts


async def snapshot_chunks(
    body: bytes | bytearray,
    media: Literal["csv", "ndjson", "json"],
    rows: int = SNAPSHOT_CHUNK_ROWS,
) -> AsyncIterator[list[Account]]:
    """An audience's complete membership as sent, ``rows`` accounts at a time, checked.

    Raises :class:`Rejected` at the first account that cannot be imported, after the
    chunks before it were yielded: the caller drops what it staged.
    """
    if media == "csv":
        async for chunk in _csv_accounts(body, rows):
            yield chunk
        return
    if media == "json":
        batch = decode_json(body, Account)
        _check_accounts(batch)
        for start in range(0, len(batch.items), rows):
            yield batch.items[start : start + rows]
        return
    pending: list[Account] = []
    async for batch in decode_ndjson(body, Account):
        _check_accounts(batch)
        pending.extend(batch.items)
        if len(pending) >= rows:
            yield pending
            pending = []
    if pending:
        yield pending


def _check_accounts(batch: Items[Account]) -> None:
    for i, account in enumerate(batch.items):
        if problem := check_account(account):
            field, detail = problem
            raise Rejected(400, f"{field} {detail}", batch.field(i, field))


def _csv_header(body: bytes | bytearray) -> list[str]:
    end = body.find(b"\n")
    first = bytes(body[: end if end >= 0 else len(body)]).rstrip(b"\r")
    if b"\r" in first:
        # Old Mac line ends: the whole file would read as one line (the csv module
        # raises on a line break outside quotes), so name the cause instead.
        raise Rejected(400, "lines end with a bare CR; end them with LF or CRLF", "header")
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Rejected(400, "the header is not UTF-8", "header") from None
    try:
        cells = next(csv.reader([text], strict=True), [])
    except csv.Error as exc:
        raise Rejected(400, f"malformed CSV header: {exc}", "header") from None
    header = [name.strip() for name in cells]
    for name in header:
        if name not in IMPORT_COLUMNS:
            raise Rejected(
                400, f"unknown column {name!r}; columns are {', '.join(IMPORT_COLUMNS)}", "header"
            )
        if header.count(name) > 1:
            raise Rejected(400, f"column {name!r} appears twice", "header")
    if _ID_COLUMN not in header:
        raise Rejected(400, f"the {_ID_COLUMN!r} column is missing", "header")
    return header


async def _csv_accounts(body: bytes | bytearray, chunk_rows: int) -> AsyncIterator[list[Account]]:
    if not body or body.isspace():  # not strip(): a copy of the whole body
        raise Rejected(400, "empty body", "body")
    _csv_header(body)
    accounts: list[Account] = []
    rows: Iterator[dict[str, str]] = read_rows(body)
    try:
        for number, row in enumerate(rows, start=1):
            external_id = row[_ID_COLUMN].strip()
            if not external_id or len(external_id) > KEY_MAX_LENGTH:
                raise Rejected(
                    400,
                    f"must hold 1 to {KEY_MAX_LENGTH} characters",
                    f"row {number}: {_ID_COLUMN}",
                )
            name, domain = row.get(_NAME_COLUMN, ""), row.get(_DOMAIN_COLUMN, "")
            if problem := import_row_problem(name, domain, external_id):
                column, detail = problem
                raise Rejected(400, f"{column} {detail}", f"row {number}: {column}")
            accounts.append(Account(external_id=external_id, name=name, domain=domain))
            if len(accounts) >= chunk_rows:
                yield accounts
                accounts = []
            elif number % ROWS_PER_TURN == 0:
                await asyncio.sleep(0)
    except ValueError as exc:
        raise Rejected(400, str(exc), "body") from None
    if accounts:
        yield accounts


def distinct_accounts(accounts: list[Account]) -> tuple[list[Account], int]:
    """One account per external id (the last one sent wins), and how many repeats went."""
    by_id = {account.external_id: account for account in accounts}
    return list(by_id.values()), len(accounts) - len(by_id)
