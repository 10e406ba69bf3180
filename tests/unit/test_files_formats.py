"""Reading AEP export files of every documented shape, built as AEP (Spark) writes them."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from dbsync.config.schema import FileColumns
from dbsync.files.formats import FileRefused, ReadCounts, Row, read_file
from dbsync.testing.aepfiles import ExportRow, epoch, write_export

AUDIENCE = "7c1f0d3a-2b4e-4c6f-9a8b-1d2e3f4a5b6c"
ROWS: list[ExportRow] = [
    ("001A@src.marketo", "Acme, Inc.", "acme.com", "realized"),
    ("001B@src.marketo", 'The "Big" Globex', "globex.com", "realized"),
    ("001C@src.marketo", "O'Reilly | Sons; Ltd: C:\\x", "oreilly.com", None),
]
EXPECTED: list[Row] = [
    ("001A@src.marketo", "Acme, Inc.", "acme.com", 1, None),
    ("001B@src.marketo", 'The "Big" Globex', "globex.com", 1, None),
    ("001C@src.marketo", "O'Reilly | Sons; Ltd: C:\\x", "oreilly.com", 1, None),
]


def read(
    path: Path, *, mode: str = "full", columns: FileColumns | None = None
) -> tuple[list[Row], ReadCounts]:
    counts = ReadCounts()
    rows = [
        row
        for chunk in read_file(path, columns or FileColumns(), mode=mode, counts=counts)
        for row in chunk
    ]
    return rows, counts


def one(tmp_path: Path, rows: list[ExportRow] = ROWS, **options: object) -> Path:
    [path] = write_export(tmp_path, AUDIENCE, rows, when=epoch(2026, 12, 3), **options)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("delimiter", [",", ";", "|", ":", "\t"])
@pytest.mark.parametrize("escape", ["\\", "'"])
def test_each_delimiter_and_escape(tmp_path: Path, delimiter: str, escape: str) -> None:
    rows, counts = read(one(tmp_path, delimiter=delimiter, escape=escape))
    assert rows == EXPECTED
    assert counts.invalid == 0


@pytest.mark.parametrize("null", ["null", '""', ""])
def test_each_null_output(tmp_path: Path, null: str) -> None:
    rows, _ = read(one(tmp_path, null=null))
    assert [r[:4] for r in rows] == [r[:4] for r in EXPECTED]


def test_quote_none(tmp_path: Path) -> None:
    plain: list[ExportRow] = [
        ("001A", "Acme Inc", "acme.com", "realized"),
        ("001B", "Globex", "g.com", None),
    ]
    rows, _ = read(one(tmp_path, plain, quote=""))
    assert [r[0] for r in rows] == ["001A", "001B"]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_encodings_and_line_ends(tmp_path: Path, encoding: str, newline: str) -> None:
    unicode: list[ExportRow] = [*ROWS, ("001D", "Zürich Œuvre 株式会社", "zurich.ch", "realized")]
    rows, _ = read(one(tmp_path, unicode, encoding=encoding, newline=newline))
    assert rows[-1] == ("001D", "Zürich Œuvre 株式会社", "zurich.ch", 1, None)
    assert rows[:3] == EXPECTED


def test_gzip_is_recognised_by_its_bytes_not_its_name(tmp_path: Path) -> None:
    path = one(tmp_path, compress=True)
    renamed = path.with_name("export.csv")
    path.rename(renamed)
    assert read(renamed)[0] == EXPECTED


def test_json_lines(tmp_path: Path) -> None:
    assert read(one(tmp_path, file_format="json"))[0] == EXPECTED


def test_json_array(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(
        '[{"accountKey_sourceKey": "X", "accountName": "X", "accountOrganization_domain": "x.com"}]'
    )
    assert read(path)[0] == [("X", "X", "x.com", 1, None)]


def test_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="the parquet extra (dbsync[parquet]) is not installed")
    assert read(one(tmp_path, file_format="parquet"))[0] == EXPECTED


def test_parquet_without_the_extra_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(FileRefused, match=r"dbsync\[parquet\]"):
        read(path)


@pytest.mark.parametrize(
    "head", [b"-----BEGIN PGP MESSAGE-----\n", bytes([0x85, 0x01, 0x0C]), bytes([0xC1, 0x4C])]
)
def test_pgp_is_refused_with_its_reason(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(head + b"\x00" * 64)
    with pytest.raises(FileRefused, match="PGP-encrypted"):
        read(path)


def test_renamed_headers_and_an_override(tmp_path: Path) -> None:
    path = one(tmp_path, headers=("external_id", "name", "domain", "status"))
    assert read(path)[0] == EXPECTED
    path = one(tmp_path, headers=("CRM_ID", "Company", "Website", "segmentMembership_ups_x_status"))
    rows, _ = read(path, columns=FileColumns(external_id="crm_id"))
    assert rows == EXPECTED


def test_a_missing_override_column_refuses(tmp_path: Path) -> None:
    with pytest.raises(FileRefused, match="no column 'crm'"):
        read(one(tmp_path), columns=FileColumns(external_id="crm"))


def test_rows_without_id_or_domain_and_name_are_counted_not_fatal(tmp_path: Path) -> None:
    rows: list[ExportRow] = [
        ("", "No Id", "noid.com", "realized"),
        ("001X", "", "", "realized"),
        ("001Y", "Y", "https://WWW.Y.com/about", None),
    ]
    got, counts = read(one(tmp_path, rows))
    assert got == [("001Y", "Y", "www.y.com", 1, None)]
    assert counts.invalid == 2
    assert counts.examples[0].endswith("row 1: no external id")


def test_exited_rows_in_an_incremental_file(tmp_path: Path) -> None:
    rows: list[ExportRow] = [
        ("001A", "A", "a.com", "exited"),
        ("001B", "B", "b.com", "realized"),
        ("001C", "", "", "exited"),
    ]
    got, counts = read(one(tmp_path, rows), mode="incremental")
    assert [(r[0], r[3]) for r in got] == [("001A", 0), ("001B", 1), ("001C", 0)]
    assert counts.invalid == 0


def test_an_exited_row_in_a_full_file_refuses_it(tmp_path: Path) -> None:
    rows: list[ExportRow] = [("001B", "B", "b.com", "realized"), ("001A", "A", "a.com", "exited")]
    with pytest.raises(FileRefused, match="row 2: an exited row in a file of a full audience"):
        read(one(tmp_path, rows))


def test_no_id_column_refuses(tmp_path: Path) -> None:
    with pytest.raises(FileRefused, match="no external id column"):
        read(one(tmp_path, headers=("company", "website")))


def test_an_empty_file_is_an_empty_run(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"")
    assert read(path)[0] == []
    path.write_bytes(gzip.compress(b"accountKey_sourceKey,accountName\n"))
    assert read(path)[0] == []


def test_qualification_times_are_read(tmp_path: Path) -> None:
    path = one(
        tmp_path,
        [("001A", "A", "a.com", "realized", "2026-12-03T01:00:00Z")],  # type: ignore[list-item]
        headers=(
            "accountKey_sourceKey",
            "accountName",
            "accountOrganization_domain",
            "status",
            "lastQualificationTime",
        ),
    )
    assert read(path)[0] == [("001A", "A", "a.com", 1, epoch(2026, 12, 3))]
