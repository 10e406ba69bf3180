"""Ingest bodies: NDJSON, JSON and CSV decoding, and refusals that name the field."""

from __future__ import annotations

import asyncio
import math

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


async def test_changes_take_their_time_or_now() -> None:
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

    acme = {"name": "Acme", "domain": "acme.com"}
    assert changes == [
        Change(audience_id="aud-1", account=Account(external_id="A", **acme), member=True, ts=NOW),
        Change(
            audience_id="aud-1",
            account=Account(external_id="B", **acme),
            member=True,
            ts=1_641_166_653.5,
        ),
        Change(
            audience_id="aud-1",
            account=Account(external_id="C", **acme),
            member=True,
            ts=1_641_166_653.5,
        ),
        Change(
            audience_id="aud-2",
            account=Account(external_id="D", **acme),
            member=False,
            ts=1_641_166_653.5,
        ),
    ]


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


async def test_a_csv_snapshot_may_carry_only_the_id_column() -> None:
    accounts = await snapshot_accounts(b"External Account ID\n001A\n001B\n", "csv")

    assert accounts == [Account(external_id="001A"), Account(external_id="001B")]


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
            b"Account Name,External Account ID\nAcme,001A\nGlobex,\n",
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
    accounts = [Account(external_id="001A", name="Acme"), Account(external_id="001B")]
    lines = b"\n".join(encode(a) for a in accounts)

    assert await snapshot_accounts(lines, "ndjson") == accounts
    assert await snapshot_accounts(encode(accounts), "json") == accounts
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
