"""Reading AEP export files: containers, encodings, CSV options, columns, rows.

Every shape Adobe documents for account-audience exports, recognised by the file's
first bytes, never its name:

* containers: gzip (``1f 8b``); Parquet (``PAR1``), read with pyarrow when the
  ``dbsync[parquet]`` extra is installed and refused naming the extra when it is not;
  PGP (binary packets or ASCII armour), refused: dbsync holds no private key;
* text: UTF-8 with or without a byte-order mark, UTF-16 (by its BOM, or by the zero
  bytes of ASCII text without one); CRLF or LF;
* CSV with a header row: the delimiter ``,`` ``;`` ``|`` ``:`` or tab (the one that
  splits the header into the most known columns), quote ``"`` or none, escape ``\\``
  or ``'`` (Spark's escaped quote is rewritten as a doubled one, which leaves a lone
  backslash or apostrophe in an unquoted value as it is), null written as ``null``,
  ``""`` or nothing;
* JSON Lines (also a JSON array, or one object).

Columns are matched ignoring case, with ``.`` and ``_`` alike: Adobe's names
(``accountKey_sourceKey``, ``accountName``, ``accountOrganization_domain``, the
membership status ``..._status``, ``..._lastQualificationTime``), the names the README
recommends (``external_id``, ``name``, ``domain``, ``status``, ``last_qualified``), common
renamings, and an audience's ``file_columns`` first of all.

A row without an external id, or without the name and domain Demandbase requires, is
counted in :attr:`ReadCounts.invalid` and left out, never fatal. An ``exited`` row in a
file of a ``full`` audience refuses the whole run (:class:`FileRefused`): a full file
never holds one, so the audience's ``file_mode`` does not match its AEP schedule.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import itertools
import operator
import re
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import msgspec

from dbsync.config.schema import FileColumns
from dbsync.demandbase.wire import import_row_problem

__all__ = ["CHUNK_ROWS", "FileRefused", "ReadCounts", "Row", "read_file"]

# Rows per chunk handed to the store (one staging transaction each).
CHUNK_ROWS = 50_000

# (external_id, name, domain, member 1/0, qualified_at or None): the store's staged row.
Row = tuple[str, str, str, int, float | None]

_DELIMITERS = (",", ";", "|", ":", "\t")
_MEMBER = frozenset({"realized", "existing", "active", ""})
_EXITED = frozenset({"exited", "expired"})

_ALIASES: dict[str, tuple[str, ...]] = {
    "external_id": (
        "accountkey_sourcekey",
        "external_id",
        "externalid",
        "external_account_id",
        "external account id",
        "account_id",
        "primaryid",
        "sourcekey",
        "sourceid",
    ),
    "name": ("accountname", "name", "account_name", "account name", "companyname", "company"),
    "domain": (
        "accountorganization_domain",
        "domain",
        "account_domain",
        "account domain",
        "accountorganization_website",
        "website",
        "companyurl",
        "accountemaildomain",
    ),
    "status": ("status", "membership_status"),
    "qualified_at": ("last_qualified", "lastqualificationtime", "last_qualification_time"),
}
# Adobe's default membership columns: segmentMembership.<namespace>.<id>.status etc.
_SUFFIXES = {"status": "_status", "qualified_at": "_lastqualificationtime"}


class FileRefused(Exception):
    """A file (or run) that cannot be applied; the message is the reason."""


class ReadCounts:
    """Counted while reading one run: rows left out, and why."""

    def __init__(self) -> None:
        self.invalid = 0
        self.examples: list[str] = []  # up to 5 "file row N: reason"

    def left_out(self, where: str, reason: str) -> None:
        self.invalid += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


def _normal(name: str) -> str:
    return name.strip().strip('"').lower().replace(".", "_")


class _Columns:
    """Which cell of a record is which field."""

    def __init__(self, header: Iterable[str], overrides: FileColumns, where: str) -> None:
        names = [_normal(h) for h in header]
        self.index: dict[str, int | None] = {}
        for field in ("external_id", "name", "domain", "status", "qualified_at"):
            override = getattr(overrides, field)
            candidates = (_normal(override),) if override else _ALIASES[field]
            found = next((names.index(c) for c in candidates if c in names), None)
            if found is None and not override and field in _SUFFIXES:
                suffix = _SUFFIXES[field]
                found = next((i for i, n in enumerate(names) if n.endswith(suffix)), None)
            if found is None and override:
                raise FileRefused(f"{where}: no column {override!r} (file_columns.{field})")
            self.index[field] = found
        if self.index["external_id"] is None:
            raise FileRefused(
                f"{where}: no external id column (accountKey_sourceKey, external_id, ...;"
                " or set file_columns.external_id); columns are " + ", ".join(header)
            )


def _epoch(value: str) -> float | None:
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


def _domain(value: str) -> str:
    """A domain as Demandbase matches it: no scheme, path or case."""
    if "/" in value:
        value = _SCHEME.sub("", value).split("/", 1)[0]
    return value.lower()


def _rows(
    records: Iterator[list[Any]],
    columns: _Columns,
    *,
    mode: str,
    where: str,
    counts: ReadCounts,
) -> Iterator[list[Row]]:
    """Records (lists of cells in header order) as chunks of staged rows."""
    at = columns.index
    id_at, name_at, domain_at = at["external_id"], at["name"], at["domain"]
    status_at, qualified_at = at["status"], at["qualified_at"]
    assert id_at is not None
    width = 1 + max(i for i in at.values() if i is not None)
    chunk: list[Row] = []
    append = chunk.append
    for number, record in enumerate(records, start=1):
        if len(record) < width:
            record = [*record, *[""] * (width - len(record))]
        external_id = _cell(record[id_at])
        name = _cell(record[name_at]) if name_at is not None else ""
        domain = _cell(record[domain_at]) if domain_at is not None else ""
        member = 1
        if status_at is not None:
            status = _cell(record[status_at]).lower()
            if status in _EXITED:
                member = 0
            elif status not in _MEMBER:
                counts.left_out(f"{where} row {number}", f"unknown status {status!r}")
                continue
        if member == 0 and mode == "full":
            raise FileRefused(
                f"{where} row {number}: an exited row in a file of a full audience; a full"
                ' export never holds one: set file_mode = "incremental" if AEP exports'
                " incremental files for this audience"
            )
        if not external_id:
            counts.left_out(f"{where} row {number}", "no external id")
            continue
        if "/" in domain or domain != domain.lower():
            domain = _domain(domain)
        if member and (problem := import_row_problem(name, domain, external_id)):
            counts.left_out(f"{where} row {number}", f"{problem[0]} {problem[1]}")
            continue
        qualified = None
        if qualified_at is not None and (text := _cell(record[qualified_at])):
            qualified = _epoch(text)
        append((external_id, name, domain, member, qualified))
        if len(chunk) >= CHUNK_ROWS:
            yield chunk
            chunk = []
            append = chunk.append
    if chunk:
        yield chunk


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = value.strip() if isinstance(value, str) else str(value).strip()
    return "" if text.lower() == "null" else text


# --- containers and text -----------------------------------------------------------------


def _is_pgp(head: bytes) -> bool:
    if head.startswith(b"-----BEGIN PGP"):
        return True
    if not head or not head[0] & 0x80:
        return False
    first = head[0]
    tag = first & 0x3F if first & 0x40 else (first >> 2) & 0x0F
    # Public-key or symmetric session key, compressed data, (SE)IPD: an encrypted message.
    return tag in (1, 3, 8, 9, 18, 20)


def _encoding(head: bytes) -> str:
    if head.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if len(head) >= 2 and b"\x00" in head[:4]:
        return "utf-16-le" if head[1] == 0 else "utf-16-be"
    return "utf-8"


def read_file(
    path: Path, columns: FileColumns, *, mode: str, counts: ReadCounts
) -> Generator[list[Row], None, None]:
    """The staged rows of one file, a chunk at a time; raises :class:`FileRefused`."""
    where = path.name
    with path.open("rb") as raw:
        head = raw.read(32)
        raw.seek(0)
        if head.startswith(b"PAR1"):
            yield from _parquet(path, columns, mode=mode, where=where, counts=counts)
            return
        if _is_pgp(head):
            raise FileRefused(
                f"{where}: PGP-encrypted; dbsync holds no private key: export this"
                " destination without encryption (the folder's access rights protect it)"
            )
        binary: IO[bytes] = raw
        if head.startswith(b"\x1f\x8b"):
            inner = gzip.GzipFile(fileobj=raw).read(8)
            binary = cast(IO[bytes], gzip.GzipFile(fileobj=_rewound(raw)))
            if inner.startswith(b"PAR1"):
                raise FileRefused(f"{where}: a gzip-compressed Parquet file; AEP writes neither")
            head = inner
        try:
            encoding = _encoding(head)
            yield from _text(binary, encoding, columns, mode=mode, where=where, counts=counts)
        except UnicodeDecodeError as exc:
            raise FileRefused(f"{where}: not UTF-8 or UTF-16 text ({exc.reason})") from None
        except (gzip.BadGzipFile, EOFError) as exc:
            raise FileRefused(f"{where}: a damaged gzip file ({exc})") from None
        except csv.Error as exc:
            raise FileRefused(f"{where}: malformed CSV ({exc})") from None


def _rewound(raw: IO[bytes]) -> IO[bytes]:
    raw.seek(0)
    return raw


def _text(
    binary: IO[bytes],
    encoding: str,
    columns: FileColumns,
    *,
    mode: str,
    where: str,
    counts: ReadCounts,
) -> Iterator[list[Row]]:
    with io.TextIOWrapper(binary, encoding=encoding, newline="") as text:
        first = text.readline()
        while first and not first.strip():
            first = text.readline()
        if not first:
            return  # an empty file: an empty run (the removal guard judges it)
        if first.lstrip().startswith(("{", "[")):
            yield from _json(first, text, columns, mode=mode, where=where, counts=counts)
            return
        header_line = first.rstrip("\r\n")
        delimiter = max(_DELIMITERS, key=lambda d: _score(header_line, d))
        sample = text.read(1 << 16) + text.readline()
        lines: Iterable[str] = itertools.chain([sample], text) if sample else text
        # Spark escapes a quote inside a quoted value as \" (or '"): the csv module reads
        # the doubled form, and only that form changes, not a lone \ or ' elsewhere.
        escape = "'" if "'\"" in sample and '\\"' not in sample else "\\"
        lines = map(operator.methodcaller("replace", escape + '"', '""'), lines)
        header = next(csv.reader([header_line], delimiter=delimiter, strict=True))
        mapped = _Columns(header, columns, where)
        records = csv.reader(_physical(lines), delimiter=delimiter, strict=True)
        yield from _rows(records, mapped, mode=mode, where=where, counts=counts)


def _physical(lines: Iterable[str]) -> Iterator[str]:
    """Lines for the csv module: a chunk of text split at its line ends (keeping them)."""
    for block in lines:
        if block.count("\n") > 1:
            yield from block.splitlines(keepends=True)
        else:
            yield block


def _score(header: str, delimiter: str) -> tuple[int, int]:
    cells = [_normal(c) for c in header.split(delimiter)]
    known = {alias for aliases in _ALIASES.values() for alias in aliases}
    recognised = sum(1 for c in cells if c in known or c.endswith(("_status", "_sourcekey")))
    return recognised, len(cells)


_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_decode_any = msgspec.json.Decoder().decode


def _json(
    first: str,
    text: io.TextIOWrapper,
    columns: FileColumns,
    *,
    mode: str,
    where: str,
    counts: ReadCounts,
) -> Iterator[list[Row]]:
    objects: Iterator[Any]
    try:
        if first.lstrip().startswith("["):
            raise msgspec.DecodeError("an array")
        start = [_decode_object(first)]
        objects = itertools.chain(start, (_decode_object(line) for line in text if line.strip()))
    except msgspec.DecodeError:
        # A JSON array, or one object over several lines: read whole.
        try:
            document = _decode_any(first + text.read())
        except msgspec.DecodeError as exc:
            raise FileRefused(f"{where}: neither JSON Lines nor JSON ({exc})") from None
        objects = iter(document if isinstance(document, list) else [document])
    keys: list[str] = []
    mapped: _Columns | None = None

    def records() -> Iterator[list[Any]]:
        nonlocal keys, mapped
        for number, item in enumerate(objects, start=1):
            if not isinstance(item, dict):
                raise FileRefused(f"{where} line {number}: not a JSON object")
            if mapped is None or list(item) != keys:
                keys = list(item)
                mapped = _Columns(keys, columns, where)
                order[:] = [_index_key(mapped, keys, f) for f in _FIELDS]
            yield [item.get(k) if k is not None else None for k in order]

    order: list[str | None] = []
    try:
        yield from _rows(records(), _FixedColumns(), mode=mode, where=where, counts=counts)
    except msgspec.DecodeError as exc:
        raise FileRefused(f"{where}: malformed JSON Lines ({exc})") from None


_FIELDS = ("external_id", "name", "domain", "status", "qualified_at")


def _index_key(mapped: _Columns, keys: list[str], field: str) -> str | None:
    index = mapped.index[field]
    return keys[index] if index is not None else None


class _FixedColumns(_Columns):
    """Records already laid out as :data:`_FIELDS` (JSON objects, Parquet batches)."""

    def __init__(self) -> None:
        self.index = {field: i for i, field in enumerate(_FIELDS)}


def _parquet(
    path: Path, columns: FileColumns, *, mode: str, where: str, counts: ReadCounts
) -> Iterator[list[Row]]:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        raise FileRefused(
            f"{where}: a Parquet file; reading Parquet needs the parquet extra:"
            " pip install 'dbsync[parquet]' (or export CSV)"
        ) from None
    parquet = pq.ParquetFile(path)
    names: list[str] = list(parquet.schema_arrow.names)
    mapped = _Columns(names, columns, where)
    wanted = [_index_key(mapped, names, f) for f in _FIELDS]
    read: list[str] = [k for k in dict.fromkeys(wanted) if k is not None]

    def records() -> Iterator[list[Any]]:
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=read):
            data: dict[str, list[Any]] = batch.to_pydict()
            cells = [data[k] if k is not None else [None] * batch.num_rows for k in wanted]
            for row in zip(*cells, strict=True):
                yield list(row)

    yield from _rows(records(), _FixedColumns(), mode=mode, where=where, counts=counts)
