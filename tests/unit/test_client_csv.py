"""The account CSV files the client uploads survive a round trip, awkward names included.

The same accounts go through the emulator (upload, then export) in
tests/integration/test_client_emulator.py.
"""

from __future__ import annotations

import pytest

from dbsync.demandbase.csvfile import encode_accounts, read_rows
from dbsync.demandbase.wire import IMPORT_COLUMNS
from dbsync.model import Account

AWKWARD = [
    Account(external_id="ext-1", name="Société Générale, S.A.", domain="societegenerale.fr"),
    Account(external_id="ext-2", name='Zürich "Labs"\nAG', domain="zurich-labs.ch"),
    Account(external_id="ext,3", name="Ōkubo 株式会社", domain="okubo.co.jp"),
    Account(external_id='ext"4', name="Line\r\nBreak\rand trailing space ", domain="crlf.io"),
    Account(external_id="ext-5", name="", domain=""),
]


def test_awkward_accounts_round_trip() -> None:
    rows = list(read_rows(encode_accounts(AWKWARD)))

    assert [
        Account(
            external_id=row["External Account ID"],
            name=row["Account Name"],
            domain=row["Account Domain"],
        )
        for row in rows
    ] == AWKWARD


def test_the_file_is_utf8_with_the_documented_header() -> None:
    data = encode_accounts(AWKWARD[:1])

    header, _, _ = data.partition(b"\r\n")
    assert header.decode("ascii").split(",") == list(IMPORT_COLUMNS)
    assert "Société".encode() in data
    assert not data.startswith(b"\xef\xbb\xbf")


def test_a_file_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(ValueError, match="not UTF-8"):
        list(read_rows("Account Name\r\nSociété\r\n".encode("latin-1")))
