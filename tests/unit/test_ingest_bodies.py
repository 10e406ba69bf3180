"""Ingest bodies: NDJSON, JSON and CSV decoding, and refusals that name the field."""

from __future__ import annotations

import asyncio
import math
from typing import Literal

import msgspec
import pytest

from dbsync.ingest.bodies import (
    CHUNK_BYTES,
    ChangeIn,
    Items,
    Rejected,
    decode_json,
    decode_ndjson,
    distinct_accounts,
    epoch_seconds,
    snapshot_accounts,
    to_changes,
)
from dbsync.model import Account, Change

NOW = 1_800_000_000.0
ACTIVE = frozenset({"aud-1", "aud-2"})
encode = msgspec.json.encode


def line(external_id: str = "001A", **fields: object) -> bytes:
    change: dict[str, object] = {
        "audience_id": "aud-1",
        "account": {"external_id": external_id, "name": "Acme", "domain": "acme.com"},
        "member": True,
    }
    change.update(fields)
    return encode(change)


async def ndjson(body: bytes) -> list[Items[ChangeIn]]:
    return [batch async for batch in decode_ndjson(body, ChangeIn)]


async def refusal(body: bytes) -> Rejected:
    with pytest.raises(Rejected) as refused:
        await ndjson(body)
    return refused.value


# --- timestamps ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1_641_166_653, 1_641_166_653.0),
        (1_641_166_653.25, 1_641_166_653.25),
        (1_641_166_653_250, 1_641_166_653.25),
        ("2022-01-02T23:37:33Z", 1_641_166_653.0),
        ("2022-01-02T23:37:33.250Z", 1_641_166_653.25),
        ("2022-01-02T23:37:33+00:00", 1_641_166_653.0),
        ("2022-01-02T23:37:33+0000", 1_641_166_653.0),
        ("2022-01-02T23:37:33.000+0000", 1_641_166_653.0),
        ("2022-01-03T00:37:33+01:00", 1_641_166_653.0),
        ("2022-01-02T23:37:33", 1_641_166_653.0),
        (" 2022-01-02T23:37:33Z ", 1_641_166_653.0),
    ],
)
def test_epoch_seconds_reads_every_documented_format(value: object, expected: float) -> None:
    assert epoch_seconds(value) == expected


@pytest.mark.parametrize(
    "value", [True, -1, math.inf, math.nan, "yesterday", "", "1641166653", None, [1]]
)
def test_epoch_seconds_refuses_what_is_not_a_time(value: object) -> None:
    with pytest.raises(ValueError, match=r"timestamp|epoch"):
        epoch_seconds(value)


# --- NDJSON --------------------------------------------------------------------------


async def test_ndjson_decodes_every_line_across_chunks() -> None:
    count = 2 * CHUNK_BYTES // len(line("000000")) + 5
    body = b"\n".join(line(f"{i:06d}") for i in range(count)) + b"\n"

    batches = await ndjson(body)

    assert len(batches) == 3
    assert [item.account.external_id for b in batches for item in b.items] == [
        f"{i:06d}" for i in range(count)
    ]
    first = len(batches[0].items)
    assert batches[1].field(0, "ts") == f"line {first + 1}: ts"
    assert batches[1].field(1, "ts") == f"line {first + 2}: ts"


async def test_ndjson_gives_the_loop_a_turn_between_chunks() -> None:
    body = b"\n".join(line(f"{i:06d}") for i in range(3 * CHUNK_BYTES // len(line("000000"))))
    turns = 0
    decoding = True

    async def count_turns() -> None:
        nonlocal turns
        while decoding:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    batches = await ndjson(body)
    decoding = False
    await counter

    assert len(batches) >= 3
    assert turns >= len(batches)


async def test_ndjson_skips_blank_lines_and_crlf_but_counts_them() -> None:
    body = line("A") + b"\r\n\r\n" + line("B") + b"\n   \n" + line("C", member="no")

    refused = await refusal(body)

    assert (refused.status, refused.field) == (400, "line 5: member")
    assert refused.error == "Expected `bool`, got `str`"


@pytest.mark.parametrize(
    ("body", "field", "error"),
    [
        (line() + b'\n{"audience_id": ', "line 2", "malformed JSON"),
        (line() + b"\n" + line(account={"name": "x"}), "line 2: account.external_id", "missing"),
        (line(account={"external_id": ""}), "line 1: account.external_id", "length >= 1"),
        (line(colour="red"), "line 1: colour", "unknown field"),
        (line(account={"external_id": "x", "tier": 1}), "line 1: account.tier", "unknown field"),
        (line(member=1), "line 1: member", "Expected `bool`"),
        (line(ts=True), "line 1: ts", "Expected"),
        (line() + b"," + line(), "line 1", "malformed JSON"),
        (b"[" + line() + b"]", "line 1", "Expected `object`"),
    ],
)
async def test_ndjson_refusals_name_the_line_and_field(body: bytes, field: str, error: str) -> None:
    refused = await refusal(body)

    assert (refused.status, refused.field) == (400, field)
    assert error in refused.error


@pytest.mark.parametrize("body", [b"", b"\n", b" \n\n \r\n"])
async def test_an_empty_ndjson_body_is_refused(body: bytes) -> None:
    refused = await refusal(body)

    assert (refused.status, refused.field, refused.error) == (400, "body", "empty body")


# --- JSON ----------------------------------------------------------------------------


def test_json_array_and_single_object() -> None:
    many = decode_json(b"[" + line("A") + b"," + line("B") + b"]", ChangeIn)
    one = decode_json(line("C"), ChangeIn)

    assert [i.account.external_id for i in many.items] == ["A", "B"]
    assert many.field(1, "member") == "[1].member"
    assert [i.account.external_id for i in one.items] == ["C"]
    assert one.field(0, "ts") == "ts"
    assert decode_json(b"[]", ChangeIn).items == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[" + line() + b"," + line(member=None) + b"]", "[1].member"),
        (b"[" + line() + b"," + line(account={}) + b"]", "[1].account.external_id"),
        (line(member=None), "member"),
        (line(extra=1), "extra"),
        (b"[" + line() + b",", "body"),
        (b'"changes"', "body"),
        (b" \n", "body"),
    ],
)
def test_json_refusals_name_the_item_and_field(body: bytes, field: str) -> None:
    with pytest.raises(Rejected) as refused:
        decode_json(body, ChangeIn)

    assert (refused.value.status, refused.value.field) == (400, field)


# --- native changes ------------------------------------------------------------------


async def test_changes_are_received_now_whatever_time_they_carry() -> None:
    body = b"\n".join(
        [
            line("A"),
            line("B", ts=1_641_166_653.5),
            line("C", ts=1_641_166_653_500),
            line("D", ts="2022-01-02T23:37:33.5Z", member=False, audience_id="aud-2"),
        ]
    )
    (batch,) = await ndjson(body)

    changes = to_changes(batch, ACTIVE, NOW)

    # The queue orders by when dbsync received a change, so a sent ts cannot jump it.
    acme = {"name": "Acme", "domain": "acme.com"}
    assert changes == [
        Change(audience_id="aud-1", account=Account(external_id=key, **acme), member=True, ts=NOW)
        for key in "ABC"
    ] + [
        Change(audience_id="aud-2", account=Account(external_id="D", **acme), member=False, ts=NOW)
    ]


@pytest.mark.parametrize(
    "ts",
    [
        -1,
        0,
        946_684_799.9,  # just before 2000-01-01
        "1999-12-31T23:59:59Z",
        "0001-01-01T00:00:00",
        "1969-07-20T20:17:00Z",
        NOW + 86_400.5,  # over a day ahead
        1e30,
        1.7e308,
        "9999-12-31T23:59:59",
    ],
)
async def test_one_range_for_ts_in_every_form(ts: object) -> None:
    (batch,) = await ndjson(line("A") + b"\n" + line("B", ts=ts))

    with pytest.raises(Rejected) as refused:
        to_changes(batch, ACTIVE, NOW)

    assert (refused.value.status, refused.value.field) == (400, "line 2: ts")


@pytest.mark.parametrize("ts", [946_684_800, "2000-01-01T00:00:00Z", NOW + 86_400, NOW * 1000])
async def test_the_ends_of_the_ts_range_are_accepted(ts: object) -> None:
    (batch,) = await ndjson(line("A", ts=ts))

    assert [c.ts for c in to_changes(batch, ACTIVE, NOW)] == [NOW]


@pytest.mark.parametrize(
    ("account", "field", "error"),
    [
        ({"external_id": "A", "domain": "acme.com"}, "line 1: account.name", "name is empty"),
        ({"external_id": "A", "name": " \t", "domain": "a.com"}, "line 1: account.name", "empty"),
        ({"external_id": "A", "name": "Acme"}, "line 1: account.domain", "domain is empty"),
        (
            {"external_id": "A", "name": "n" * 256, "domain": "a.com"},
            "line 1: account.name",
            "256 characters; at most 255",
        ),
        (
            {"external_id": "A", "name": "Acme", "domain": "d" * 256},
            "line 1: account.domain",
            "256 characters; at most 255",
        ),
        (
            {"external_id": "   ", "name": "Acme", "domain": "a.com"},
            "line 1: account.external_id",
            "not only spaces",
        ),
    ],
)
async def test_accounts_demandbase_refuses_are_400_naming_the_field(
    account: dict[str, str], field: str, error: str
) -> None:
    (batch,) = await ndjson(line("A", account=account))

    with pytest.raises(Rejected) as refused:
        to_changes(batch, ACTIVE, NOW)

    assert (refused.value.status, refused.value.field) == (400, field)
    assert error in refused.value.error


async def test_an_unknown_audience_is_404_naming_the_line() -> None:
    (batch,) = await ndjson(line("A") + b"\n" + line("B", audience_id="aud-9"))

    with pytest.raises(Rejected) as refused:
        to_changes(batch, ACTIVE, NOW)

    assert (refused.value.status, refused.value.field) == (404, "line 2: audience_id")
    assert "aud-9" in refused.value.error


async def test_a_bad_timestamp_is_400_naming_the_line() -> None:
    (batch,) = await ndjson(line("A") + b"\n\n" + line("B", ts="soon"))

    with pytest.raises(Rejected) as refused:
        to_changes(batch, ACTIVE, NOW)

    assert (refused.value.status, refused.value.field) == (400, "line 3: ts")


# --- snapshots -----------------------------------------------------------------------


async def test_a_csv_snapshot_reads_the_import_columns() -> None:
    body = (
        "\ufeffAccount Name,Account Domain,External Account ID\r\n"
        '"Société Générale, S.A.",socgen.com,001A\r\n'
        "\r\n"
        'Zürich "Labs",zurich.example, 001B \r\n'
    ).encode()

    accounts = await snapshot_accounts(body, "csv")

    assert accounts == [
        Account(external_id="001A", name="Société Générale, S.A.", domain="socgen.com"),
        Account(external_id="001B", name='Zürich "Labs"', domain="zurich.example"),
    ]


@pytest.mark.parametrize(
    ("body", "field", "error"),
    [
        (b"External Account ID\n001A\n", "row 1: Account Name", "is empty"),
        (b"Account Name,External Account ID\nAcme,001A\n", "row 1: Account Domain", "is empty"),
        (
            b"Account Name,Account Domain,External Account ID\nA,a.com,1\n  ,b.com,2\n",
            "row 2: Account Name",
            "is empty",
        ),
        (
            b"Account Name,Account Domain,External Account ID\nA," + b"d" * 256 + b",1\n",
            "row 1: Account Domain",
            "at most 255",
        ),
    ],
)
async def test_csv_rows_demandbase_refuses_are_400_naming_row_and_column(
    body: bytes, field: str, error: str
) -> None:
    with pytest.raises(Rejected) as refused:
        await snapshot_accounts(body, "csv")

    assert (refused.value.status, refused.value.field) == (400, field)
    assert error in refused.value.error


@pytest.mark.parametrize(
    "body",
    [
        b"Account Name,Account Domain,External Account ID\rAcme,acme.com,1\r",
        b"External Account ID\rAcme\r",
    ],
)
async def test_a_csv_with_bare_cr_line_ends_is_400_naming_them(body: bytes) -> None:
    with pytest.raises(Rejected) as refused:
        await snapshot_accounts(body, "csv")

    assert (refused.value.status, refused.value.field) == (400, "header")
    assert "bare CR" in refused.value.error


async def test_a_csv_header_alone_is_an_empty_membership() -> None:
    assert (
        await snapshot_accounts(b"Account Name,Account Domain,External Account ID\n", "csv") == []
    )


@pytest.mark.parametrize(
    ("body", "field", "error"),
    [
        (b"", "body", "empty body"),
        (b"Account Name,Account Domain\nAcme,acme.com\n", "header", "missing"),
        (b"External Account ID,Tier\n001A,1\n", "header", "unknown column 'Tier'"),
        (b"External Account ID,External Account ID\n1,2\n", "header", "twice"),
        (b"\xff\xfeE\x00\n", "header", "not UTF-8"),
        (
            b"Account Name,Account Domain,External Account ID\nAcme,a.com,001A\nGlobex,g.com,\n",
            "row 2: External Account ID",
            "1 to 256",
        ),
        (b"External Account ID\n" + b"x" * 257 + b"\n", "row 1: External Account ID", "1 to 256"),
        (b'External Account ID\n"001A\n', "body", "malformed CSV"),
    ],
)
async def test_csv_refusals_name_the_header_or_row(body: bytes, field: str, error: str) -> None:
    with pytest.raises(Rejected) as refused:
        await snapshot_accounts(body, "csv")

    assert (refused.value.status, refused.value.field) == (400, field)
    assert error in refused.value.error


async def test_ndjson_and_json_snapshots_are_accounts() -> None:
    accounts = [
        Account(external_id="001A", name="Acme", domain="acme.com"),
        Account(external_id="001B", name="B", domain="b.com"),
    ]
    lines = b"\n".join(encode(a) for a in accounts)

    assert await snapshot_accounts(lines, "ndjson") == accounts
    assert await snapshot_accounts(encode(accounts), "json") == accounts


@pytest.mark.parametrize(
    ("media", "body", "field"),
    [
        (
            "ndjson",
            b'{"external_id": "A", "name": "Acme", "domain": "a.com"}\n{"external_id": "B"}',
            "line 2: name",
        ),
        ("json", b'[{"external_id": "A", "name": "Acme", "domain": " "}]', "[0].domain"),
        ("json", b'{"external_id": "A", "name": "", "domain": "a.com"}', "name"),
    ],
)
async def test_json_snapshot_accounts_demandbase_refuses_are_400(
    media: Literal["json", "ndjson"], body: bytes, field: str
) -> None:
    with pytest.raises(Rejected) as refused:
        await snapshot_accounts(body, media)

    assert (refused.value.status, refused.value.field) == (400, field)
    with pytest.raises(Rejected) as refused:
        await snapshot_accounts(b'{"external_id": "001A", "member": true}', "ndjson")
    assert refused.value.field == "line 1: member"


def test_distinct_accounts_keeps_the_last_of_each_id() -> None:
    sent = [
        Account(external_id="A", name="old"),
        Account(external_id="B"),
        Account(external_id="A", name="new"),
    ]

    assert distinct_accounts(sent) == (
        [Account(external_id="A", name="new"), Account(external_id="B")],
        1,
    )
