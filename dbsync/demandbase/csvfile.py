"""Account CSV files: the import files dbsync uploads and the export results it reads.

The stdlib ``csv`` module with ``QUOTE_MINIMAL`` quotes any field holding a comma, a
quote or a line break, and doubles embedded quotes, which is RFC 4180 and what
Demandbase's importer reads. Files are UTF-8 without a byte-order mark; names such as
"Société Générale, S.A." or "Zürich \"Labs\"\\nAG" survive a round trip.
"""

from __future__ import annotations

import csv
import io
import itertools
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _csv import Reader

from dbsync.demandbase.wire import EXPORT_RESULT_COLUMNS, IMPORT_COLUMNS
from dbsync.model import Account

__all__ = [
    "encode_accounts",
    "encode_cells",
    "encode_rows",
    "read_header",
    "read_results",
    "read_rows",
]

# Bytes decoded at a time by :func:`read_rows`.
_BLOCK_BYTES = 1 << 20


def encode_rows(header: Sequence[str], rows: Iterable[Sequence[str]]) -> bytes:
    """A CSV file (header first, CRLF line ends) as UTF-8 bytes."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def encode_cells(rows: Iterable[Sequence[str]]) -> list[str]:
    """Each row as :func:`encode_rows` writes it, without its line end: joined with
    CRLFs after a header, they make the same file."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator="")
    lines = []
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(row)
        lines.append(buffer.getvalue())
    return lines


def encode_accounts(accounts: Iterable[Account]) -> bytes:
    """An import file: ``Account Name, Account Domain, External Account ID``."""
    return encode_rows(IMPORT_COLUMNS, ((a.name, a.domain, a.external_id) for a in accounts))


def read_rows(data: bytes | bytearray) -> Iterator[dict[str, str]]:
    """Rows of a CSV file keyed by its header; raises ``ValueError`` if it is not CSV.

    A leading byte-order mark is tolerated; cells missing at the end of a short row
    read as empty strings.
    """
    reader = csv.reader(_lines(data), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        for row in reader:
            if not row:
                continue
            yield {name: (row[i] if i < len(row) else "") for i, name in enumerate(header)}
    except csv.Error as exc:
        raise ValueError(f"malformed CSV at line {reader.line_num}: {exc}") from exc


def read_header(data: bytes) -> list[str]:
    """The header row of a CSV file, cells stripped (a BOM tolerated); [] if empty."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 at byte {exc.start}") from exc
    first = next(csv.reader(io.StringIO(text, newline="")), None)
    return [cell.strip() for cell in first] if first else []


def read_results(
    data: bytes, columns: Sequence[str] = EXPORT_RESULT_COLUMNS
) -> Iterator[tuple[str, ...]]:
    """The cells of ``columns`` in each row of an export results file, in that order.

    Columns are matched by name, case-insensitively; their order and any other
    columns do not matter, and a BOM and CRLF line ends are read. A file without a
    header has no rows; cells missing at the end of a short row read as empty strings.
    Raises ``ValueError`` if it is not CSV or lacks a column, at once for the header,
    else as the rows are read. One pass, by position, and lazily: a results file may
    hold millions of rows, and what a row becomes is its caller's to build.
    """
    reader = csv.reader(_lines(data), strict=True)
    try:
        header = [cell.strip() for cell in next(reader, None) or ()]
    except csv.Error as exc:
        raise ValueError(f"malformed CSV at line {reader.line_num}: {exc}") from exc
    if not header:
        return iter(())
    # A name given twice: its last column, as a row keyed by name would hold.
    at = {name.casefold(): i for i, name in enumerate(header)}
    missing = [c for c in columns if c.casefold() not in at]
    if missing:
        raise ValueError(f"the header lacks the columns {missing} (it has {header})")
    positions = [at[c.casefold()] for c in columns]
    return _picked(reader, positions)


def _picked(reader: Reader, positions: list[int]) -> Iterator[tuple[str, ...]]:
    width = max(positions) + 1
    padding = [""] * width
    pick = operator.itemgetter(*positions)
    try:
        for row in reader:
            if row:
                yield pick(row) if len(row) >= width else pick(row + padding[len(row) :])
    except csv.Error as exc:
        raise ValueError(f"malformed CSV at line {reader.line_num}: {exc}") from exc


def _lines(data: bytes | bytearray) -> Iterator[str]:
    """The lines of ``data`` (ends kept), decoded a block at a time.

    Not ``StringIO(data.decode())``: that holds the text twice more, the second time at
    up to 4 bytes a character (a 44 MiB snapshot body cost ~220 MiB). Split at LF only,
    as ``newline=""`` does, so that a CR, or a form feed, inside a value stays in it.
    Each block's lines are a list, chained, so that ``csv`` reads them without a
    Python frame per line (that cost as much as parsing them).
    """
    return itertools.chain.from_iterable(_line_blocks(data))


def _line_blocks(data: bytes | bytearray) -> Iterator[list[str]]:
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    while start < len(data):
        end = data.find(b"\n", min(start + _BLOCK_BYTES, len(data)) - 1)
        end = len(data) if end < 0 else end + 1
        try:
            text = data[start:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 at byte {start + exc.start}") from exc
        lines = text.split("\n")
        last = lines.pop()
        lines = [line + "\n" for line in lines]
        if last:
            lines.append(last)
        yield lines
        start = end
