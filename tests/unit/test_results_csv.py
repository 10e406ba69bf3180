"""Export results files, decoded a block at a time, are read as ``csv`` reads them whole.

``read_results`` decodes a file in blocks of whole lines and chains their lines into
one ``csv.reader``, which reads on across blocks while a quoted cell spans lines.
Random files (quoted cells, embedded line breaks and carriage returns, CRLF or LF,
blank lines, short rows, a BOM), cut into blocks of a few bytes so that quoted cells
straddle them, must give the rows that ``csv.reader(strict=True)`` gives over the whole
text's lines, and a file ``csv`` refuses must be refused.
"""

from __future__ import annotations

import csv
import io
import operator
import random

import pytest

from dbsync.demandbase import csvfile
from dbsync.demandbase.csvfile import read_results

COLUMNS = ("Account Name", "External Account ID")
# Plain cells mostly, as real files are; now and then one csv must quote.
PLAIN = ["Acme", "acct-0001", "", " spaced ", "Société", "株式会社", "a\tb", "x;y"]
AWKWARD = ["Acme, Inc.", 'Zürich "Labs"', "two\nlines", "cr\ronly", "crlf\r\ninside", '"']


def reference(data: bytes, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    """What csv alone reads: the whole text's lines (split at LF only, so that a bare
    CR is refused outside quotes), one reader, the columns picked."""
    text = data.decode("utf-8-sig")
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    reader = csv.reader(filter(None, lines), strict=True)
    header = [cell.strip() for cell in next(reader, None) or ()]
    if not header:
        return []
    at = {name.casefold(): i for i, name in enumerate(header)}
    positions = [at[c.casefold()] for c in columns]
    width = max(positions) + 1
    pick = operator.itemgetter(*positions)
    return [pick(row + [""] * (width - len(row))) for row in reader if row]


def random_file(rng: random.Random) -> bytes:
    header = ["Account ID", "Account Name", "Account Domain", "External Account ID"]
    rng.shuffle(header)
    buffer = io.StringIO(newline="")
    end = rng.choice(["\n", "\r\n"])
    writer = csv.writer(buffer, quoting=csv.QUOTE_MINIMAL, lineterminator=end)
    writer.writerow(header)
    for _ in range(rng.randrange(0, 40)):
        if rng.random() < 0.05:
            buffer.write(end)  # a blank line
            continue
        awkward = rng.random() < 0.1
        row = [rng.choice(AWKWARD if awkward and rng.random() < 0.5 else PLAIN) for _ in header]
        writer.writerow(row[: rng.randrange(1, 5)] if rng.random() < 0.05 else row)
    text = buffer.getvalue()
    if rng.random() < 0.3:
        text = text.rstrip("\r\n")  # no line end at the end
    bom = b"\xef\xbb\xbf" if rng.random() < 0.2 else b""
    return bom + text.encode("utf-8")


@pytest.mark.parametrize("seed", range(40))
def test_rows_are_what_csv_reads(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        monkeypatch.setattr(csvfile, "_BLOCK_BYTES", rng.randrange(1, 200))
        data = random_file(rng)

        try:
            expected = reference(data, COLUMNS)
        except csv.Error:  # a bare CR outside quotes, in an LF file
            with pytest.raises(ValueError, match="malformed CSV"):
                list(read_results(data, COLUMNS))
            continue
        assert list(read_results(data, COLUMNS)) == expected


@pytest.mark.parametrize(
    "text",
    [
        'Account Name,External Account ID\nAcme,"open\nnever closed\n',
        'Account Name,External Account ID\nAcme,"x"y\n',
        "Account Name,External Account ID\nAcme,bare\rcr\n",
    ],
)
def test_what_csv_refuses_is_refused(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(csv.Error):
        reference(text.encode(), COLUMNS)
    for block_bytes in (1, 7, 1 << 20):
        monkeypatch.setattr(csvfile, "_BLOCK_BYTES", block_bytes)
        with pytest.raises(ValueError, match="malformed CSV at line"):
            list(read_results(text.encode(), COLUMNS))
