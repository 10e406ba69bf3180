"""The generated account database: deterministic, awkward on purpose, matched like Demandbase."""

from __future__ import annotations

from dbsync.demandbase.csvfile import encode_accounts, read_rows
from dbsync.demandbase.emulator.accounts import AccountDatabase, match_key


def test_the_same_seed_gives_the_same_database_and_another_seed_another() -> None:
    first, again, other = AccountDatabase(500, 1), AccountDatabase(500, 1), AccountDatabase(500, 2)
    assert list(first.page(0, 500)) == list(again.page(0, 500))
    assert [a.name for a in first.page(0, 500)] != [a.name for a in other.page(0, 500)]
    assert [a.external_id for a in first.page(0, 3)] == [
        "ACC-0000001",
        "ACC-0000002",
        "ACC-0000003",
    ]
    assert first.demandbase_id(0) == 1


def test_names_exercise_csv_quoting_and_utf8_and_survive_a_round_trip() -> None:
    accounts = list(AccountDatabase(3000, 0).page(0, 3000))
    names = [a.name for a in accounts]
    assert any("," in name for name in names)
    assert any('"' in name for name in names)
    assert any(not name.isascii() for name in names)
    assert all(a.domain.isascii() and a.domain == a.domain.lower() for a in accounts)
    rows = list(read_rows(encode_accounts(accounts)))
    assert [(r["Account Name"], r["Account Domain"]) for r in rows] == [
        (a.name, a.domain) for a in accounts
    ]


def test_domains_stay_unique_past_the_word_combinations() -> None:
    database = AccountDatabase(120_000, 3)  # more than the 47,104 combinations
    assert len({database.domain(i) for i in range(len(database))}) == 120_000


def test_matching_tries_the_external_id_first_then_domain_and_name() -> None:
    database = AccountDatabase(100, 5)
    name, domain = database.name(7), database.domain(7)
    assert database.match(database.external_id(3), domain, name) == 3  # the id wins
    assert database.match("", f"  {domain.upper()}", name.lower() + " ") == 7
    assert database.match("CRM-unknown", domain, name) == 7  # unknown id: fall back
    assert database.match("", domain, "Another Name") is None
    assert database.match("", "", "") is None
    assert database.index_of("ACC-0000100") == 99
    assert database.index_of("ACC-0000101") is None
    assert match_key(" Ab.COM ", "Société") == ("ab.com", "société")
