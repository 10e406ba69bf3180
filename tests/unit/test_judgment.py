"""The read-back judgment alone: no SQLite, one table row per rule.

Each case is one of our accounts as the store holds it, whether the list holds it,
and what the judge must decide. A broken rule fails its row by name.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest

from dbsync.judgment import (
    ChunkDecision,
    Judgment,
    Listing,
    MemberRow,
    judge_chunk,
    match_key,
    match_listed,
    set_aside_reason,
)
from dbsync.model import Account, ListedAccount, LossCause, RejectReason

CUTOFF = 1_000.0
OLD = 500.0  # acknowledged (or changed) before the cutoff: judged
YOUNG = 1_500.0  # after it: too young to judge
REPAIR_LIMIT = 3


def row(
    *,
    desired: int,
    delivered: int | None = None,
    in_flight: int | None = None,
    rejected: int = 0,
    acked_at: float | None = OLD,
    ack: int | None = 7,
    changed_at: float = OLD,
    repairs: int = 0,
) -> MemberRow:
    return (
        "K",
        "K Inc.",
        "k.example",
        desired,
        desired if delivered is None else delivered,
        in_flight,
        rejected,
        acked_at,
        ack,
        changed_at,
        repairs,
    )


class Case(NamedTuple):
    row: MemberRow
    in_list: bool
    # The decision's non-empty parts, keys named by what they hold.
    expected: dict[str, object]


CASES: dict[str, Case] = {
    "member acknowledged and listed: verified, its ack cleared": Case(
        row(desired=1),
        True,
        {
            "expected": 1,
            "verified": 1,
            "cleared": ["K"],
            "verified_acks": 1,
            "batch_verified": {7: 1},
        },
    ),
    "member seen before, listed, repaired once: verified, repairs cleared": Case(
        row(desired=1, ack=None, repairs=1), True, {"expected": 1, "verified": 1, "cleared": ["K"]}
    ),
    "member seen before, listed: verified, nothing to clear": Case(
        row(desired=1, ack=None), True, {"expected": 1, "verified": 1}
    ),
    "member acknowledged, missing: dropped, sent again": Case(
        row(desired=1),
        False,
        {
            "expected": 1,
            "lost": {LossCause.DROPPED: 1},
            "batch_lost": {7: 1},
            "resend_inserts": ["K"],
        },
    ),
    "member seen before, missing: vanished, sent again": Case(
        row(desired=1, ack=None),
        False,
        {"expected": 1, "lost": {LossCause.VANISHED: 1}, "resend_inserts": ["K"]},
    ),
    "member repaired once, missing again: the same loss, not on its batch again": Case(
        row(desired=1, repairs=1),
        False,
        {"expected": 1, "lost": {LossCause.DROPPED: 1}, "resend_inserts": ["K"]},
    ),
    "member missing after the repair limit: set aside as unmatched": Case(
        row(desired=1, repairs=REPAIR_LIMIT),
        False,
        {
            "expected": 1,
            "lost": {LossCause.DROPPED: 1},
            "unmatched": [(Account(external_id="K", name="K Inc.", domain="k.example"), 3)],
        },
    ),
    "removal acknowledged, gone from the list: verified": Case(
        row(desired=0),
        False,
        {"cleared": ["K"], "verified_acks": 1, "batch_verified": {7: 1}},
    ),
    "never a member, not listed: nothing to say": Case(row(desired=0, ack=None), False, {}),
    "removal acknowledged, still listed: not removed, sent again": Case(
        row(desired=0),
        True,
        {"lost": {LossCause.NOT_REMOVED: 1}, "batch_lost": {7: 1}, "resend_deletes": ["K"]},
    ),
    "removal still listed after the repair limit: set aside as not removable": Case(
        row(desired=0, repairs=REPAIR_LIMIT + 2),
        True,
        {
            "lost": {LossCause.NOT_REMOVED: 1},
            "not_removable": [(Account(external_id="K", name="K Inc.", domain="k.example"), 5)],
        },
    ),
    "listed, not a member, no acknowledgment: extra, marked for removal": Case(
        row(desired=0, ack=None), True, {"extras": ["K"]}
    ),
    "pending (desired differs from delivered): unsettled": Case(
        row(desired=1, delivered=0), False, {"unsettled": 1}
    ),
    "in flight: unsettled": Case(row(desired=1, in_flight=3), True, {"unsettled": 1}),
    "set aside: unsettled": Case(row(desired=1, rejected=1), False, {"unsettled": 1}),
    "set aside, not a member, not listed, no ack: irrelevant": Case(
        row(desired=0, rejected=1, ack=None), False, {}
    ),
    "acknowledged after the cutoff: too young, never lost": Case(
        row(desired=1, acked_at=YOUNG), False, {"too_young": 1}
    ),
    "never acknowledged, changed after the cutoff: too young": Case(
        row(desired=1, acked_at=None, ack=None, changed_at=YOUNG), False, {"too_young": 1}
    ),
    "never acknowledged, changed long ago, missing: vanished": Case(
        row(desired=1, acked_at=None, ack=None),
        False,
        {"expected": 1, "lost": {LossCause.VANISHED: 1}, "resend_inserts": ["K"]},
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_one_account_is_judged_by_the_rule(case: Case) -> None:
    present = {"K"} if case.in_list else set()
    decision = judge_chunk([case.row], present, judged_before=CUTOFF, repair_limit=REPAIR_LIMIT)
    empty = ChunkDecision()
    found = {
        field: getattr(decision, field)
        for field in ChunkDecision.__struct_fields__
        if getattr(decision, field) != getattr(empty, field)
    }
    assert found == case.expected


def test_a_chunk_sums_its_accounts_and_the_judgment_keeps_the_totals() -> None:
    rows = [case.row for case in CASES.values()]
    decisions = [
        judge_chunk(
            [case.row],
            {"K"} if case.in_list else set(),
            judged_before=CUTOFF,
            repair_limit=REPAIR_LIMIT,
        )
        for case in CASES.values()
    ]
    judgment = Judgment()
    for decision in decisions:
        judgment.add(decision)
    judgment.add(ChunkDecision(), strangers_removed=2)
    listing = Listing(
        listed=9,
        strangers={},
        nameless=4,
        judged_before=CUTOFF,
        repair_limit=REPAIR_LIMIT,
        now=CUTOFF,
    )
    verdict = judgment.verdict(listing)
    assert len(rows) == 19
    assert (verdict.listed, verdict.expected, verdict.verified) == (9, 8, 3)
    assert verdict.lost == {"dropped": 3, "vanished": 2, "not_removed": 2}
    assert verdict.repaired == 5  # 4 inserts, 1 delete; the other two were set aside
    assert (verdict.extra_removed, verdict.extra_kept) == (1 + 2, 4)
    assert [a.external_id for a in verdict.unmatched + verdict.not_removable] == ["K", "K"]
    assert (verdict.too_young, verdict.unsettled) == (2, 3)


def test_listed_accounts_match_by_external_id_then_by_domain_and_name() -> None:
    ours = [("A", "Alpha", "alpha.example"), ("B", "Beta Corp", "beta.example")]
    listed = [
        ListedAccount(external_id="A", name="renamed", domain="elsewhere.example"),
        ListedAccount(external_id="", name="  BETA corp ", domain="Beta.Example "),
        ListedAccount(external_id="Z", name="Zed", domain="zed.example"),
        ListedAccount(external_id="Z", name="Zed again", domain="zed.example"),
        ListedAccount(external_id="", name="Nobody", domain="nobody.example"),
    ]
    present, strangers, nameless = match_listed(ours, listed)
    assert present == {"A", "B"}
    assert list(strangers) == ["Z"]
    assert strangers["Z"].name == "Zed"  # the first one kept
    assert nameless == 1
    assert match_key(" X.example", "ACME ") == ("x.example", "acme")


def test_reason_texts_name_the_reason_and_the_repairs() -> None:
    assert set_aside_reason(RejectReason.UNMATCHED, 3) == (
        "unmatched: still missing from the list after 3 repairs: Demandbase has no"
        " account matching its external id, domain or name"
    )
    assert set_aside_reason(RejectReason.NOT_REMOVABLE, 2) == (
        "not_removable: still in the list after 2 removals were acknowledged"
    )
