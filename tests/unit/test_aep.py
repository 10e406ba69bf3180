"""AEP profile exports mapped to changes: Adobe's documented shapes, and every refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from dbsync.ingest.aep import AepMapping, changes_from_aep
from dbsync.ingest.bodies import Rejected
from dbsync.model import Account, Change

DATA = Path(__file__).parent.parent / "data" / "aep"
HIGH_INTENT = "59bd2f4d-3c48-4b18-bf56-4f5c5e6967ae"
CHURN_RISK = "7841ba61-23c1-4bb3-a495-00d3a5fe1e93"
ACTIVE = frozenset({HIGH_INTENT, CHURN_RISK})
NOW = 1_800_000_000.0
DEFAULT = AepMapping()


def fixture(name: str) -> Any:
    return msgspec.json.decode((DATA / name).read_bytes())


def test_a_single_profile_maps_the_demandbase_mandatory_attributes() -> None:
    batch = changes_from_aep(fixture("single.json"), active=ACTIVE, mapping=DEFAULT, now=NOW)

    acme = Account(external_id="0015g00000ACMEAAA1", name="Acme Corporation", domain="acme.com")
    assert batch.changes == [
        Change(audience_id=CHURN_RISK, account=acme, member=False, ts=NOW),
        Change(audience_id=HIGH_INTENT, account=acme, member=True, ts=NOW),
    ]
    assert batch.profiles == 1
    assert batch.profiles_ignored == 0
    assert batch.audiences_ignored == {
        "947c1c46-008d-40b0-92ec-3af86eaf41c1": 1,
        "5114d758-ce71-43ba-b53e-e2a91d67b67f": 1,
    }


def test_an_array_of_destination_sdk_profiles_with_the_key_in_the_identity_map() -> None:
    mapping = AepMapping(domain_attribute="accountEmailDomain", identity_namespace="b2b_account")

    document = fixture("array.json")
    with pytest.raises(Rejected) as refused:  # Demandbase refuses an account without a domain
        changes_from_aep(document, active=ACTIVE, mapping=mapping, now=NOW)
    document[0]["attributes"]["accountEmailDomain"] = {"value": "globex.example"}

    batch = changes_from_aep(document, active=ACTIVE, mapping=mapping, now=NOW)

    assert (refused.value.field, refused.value.error) == (
        "[0].accountEmailDomain",
        "domain is empty",
    )
    globex = Account(external_id="0015g00000GLOBAA2", name="Globex Ltd", domain="globex.example")
    initech = Account(external_id="0015g00000INITAA3", name="Initech", domain="initech.example")
    assert batch.changes == [
        Change(audience_id=HIGH_INTENT, account=globex, member=True, ts=NOW),
        Change(audience_id=CHURN_RISK, account=globex, member=True, ts=NOW),
        Change(
            audience_id=HIGH_INTENT,
            account=initech,
            member=False,
            ts=NOW,
        ),
    ]
    assert batch.audiences_ignored == {"8f812592-3f06-416b-bd50-e7831848a31a": 1}


def test_a_batch_wrapper_counts_what_it_ignores() -> None:
    batch = changes_from_aep(fixture("batch.json"), active=ACTIVE, mapping=DEFAULT, now=NOW)

    assert [(c.account.external_id, c.member, c.ts) for c in batch.changes] == [
        ("0015g00000UMBRAA4", True, NOW),
        ("0015g00000HOOLAA5", False, NOW),
    ]
    assert batch.changes[0].account.domain == "umbrella.example"
    assert batch.profiles == 3
    assert batch.profiles_ignored == 1  # in no activated audience, and without a key
    assert batch.audiences_ignored == {
        "354e086f-2e11-49a2-9e39-e5d9a76be683": 2,
        "8f812592-3f06-416b-bd50-e7831848a31a": 1,
    }


def profile(status: object = "realized", **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "accountKey": {"sourceKey": "001A"},
        "accountName": "Acme",
        "accountOrganization": {"domain": "acme.com"},
        "segmentMembership": {
            "ups": {
                HIGH_INTENT: {"status": status, "lastQualificationTime": "2022-01-02T23:37:33Z"}
            }
        },
    }
    document.update(fields)
    return document


@pytest.mark.parametrize(
    "value",
    [
        1_641_166_653_000,  # epoch milliseconds
        1_641_166_653,  # epoch seconds
        "2022-01-02T23:37:33",  # no offset: UTC
        "2000-01-01T00:00:00Z",  # the earliest accepted
        NOW + 86_400,  # a day ahead: clock skew
        None,  # absent
    ],
)
def test_qualification_times_in_each_format_are_checked_and_received_now(value: object) -> None:
    document = profile()
    document["segmentMembership"]["ups"][HIGH_INTENT]["lastQualificationTime"] = value

    batch = changes_from_aep(document, active=ACTIVE, mapping=DEFAULT, now=NOW)

    # The queue orders by when dbsync received a change: an old time must not jump it.
    assert batch.changes[0].ts == NOW


@pytest.mark.parametrize(
    "value",
    ["1999-12-31T23:59:59Z", "0001-01-01T00:00:00", 0, 946_684_799, NOW + 86_401, "9999-12-31"],
)
def test_qualification_times_outside_the_range_are_refused(value: object) -> None:
    document = profile()
    document["segmentMembership"]["ups"][HIGH_INTENT]["lastQualificationTime"] = value

    with pytest.raises(Rejected) as refused:
        changes_from_aep(document, active=ACTIVE, mapping=DEFAULT, now=NOW)

    assert refused.value.field == f"segmentMembership.ups.{HIGH_INTENT}.lastQualificationTime"
    assert "outside the accepted range" in refused.value.error


@pytest.mark.parametrize(
    ("fields", "field", "error"),
    [
        ({"accountName": None}, "accountName", "name is empty"),
        ({"accountName": "  "}, "accountName", "name is empty"),
        ({"accountName": "n" * 256}, "accountName", "name holds 256 characters; at most 255"),
        ({"accountOrganization": {}}, "accountOrganization.domain", "domain is empty"),
        (
            {"accountOrganization": {"domain": "d" * 256}},
            "accountOrganization.domain",
            "domain holds 256 characters; at most 255",
        ),
    ],
)
def test_accounts_demandbase_refuses_are_refused(
    fields: dict[str, Any], field: str, error: str
) -> None:
    with pytest.raises(Rejected) as refused:
        changes_from_aep(profile(**fields), active=ACTIVE, mapping=DEFAULT, now=NOW)

    assert (refused.value.status, refused.value.field, refused.value.error) == (400, field, error)


def test_a_profile_without_segment_membership_is_ignored() -> None:
    batch = changes_from_aep({"accountName": "Acme"}, active=ACTIVE, mapping=DEFAULT, now=NOW)

    assert (batch.changes, batch.profiles, batch.profiles_ignored) == ([], 1, 1)


@pytest.mark.parametrize(
    ("document", "status", "field"),
    [
        (5, 400, "body"),
        ([profile(), "nope"], 400, "[1]"),
        ([profile(accountKey={})], 400, "[0].accountKey.sourceKey"),
        (
            {"profiles": [profile(), profile(accountKey=None)]},
            400,
            "profiles[1].accountKey.sourceKey",
        ),
        (profile(accountKey={"sourceKey": 42}), 400, "accountKey.sourceKey"),
        (profile(accountKey={"sourceKey": " "}), 400, "accountKey.sourceKey"),
        (profile(accountKey={"sourceKey": "x" * 257}), 400, "accountKey.sourceKey"),
        (profile(status="qualified"), 400, f"segmentMembership.ups.{HIGH_INTENT}.status"),
        (profile(status=["realized"]), 400, f"segmentMembership.ups.{HIGH_INTENT}.status"),
        (profile(segmentMembership=[]), 400, "segmentMembership"),
        (profile(segmentMembership={"ups": []}), 400, "segmentMembership.ups"),
        (
            profile(segmentMembership={"ups": {HIGH_INTENT: "realized"}}),
            400,
            f"segmentMembership.ups.{HIGH_INTENT}",
        ),
        (profile(accountName=7), 400, "accountName"),
        (
            profile(accountName=None, attributes={"accountName": {"value": 7}}),
            400,
            "attributes.accountName",
        ),
    ],
)
def test_refusals_name_the_field(document: object, status: int, field: str) -> None:
    with pytest.raises(Rejected) as refused:
        changes_from_aep(document, active=ACTIVE, mapping=DEFAULT, now=NOW)

    assert (refused.value.status, refused.value.field) == (status, field)


def test_a_bad_qualification_time_names_its_field() -> None:
    document = profile()
    document["segmentMembership"]["ups"][HIGH_INTENT]["lastQualificationTime"] = "yesterday"

    with pytest.raises(Rejected) as refused:
        changes_from_aep([document], active=ACTIVE, mapping=DEFAULT, now=NOW)

    assert refused.value.field == f"[0].segmentMembership.ups.{HIGH_INTENT}.lastQualificationTime"
    assert "yesterday" in refused.value.error


def test_a_profile_only_in_unactivated_audiences_needs_no_key() -> None:
    document = profile(accountKey=None)

    batch = changes_from_aep(document, active={"someone-else"}, mapping=DEFAULT, now=NOW)

    assert batch.changes == []
    assert batch.audiences_ignored == {HIGH_INTENT: 1}
    assert batch.profiles_ignored == 1


@pytest.mark.parametrize(
    ("identity_map", "field"),
    [
        (None, "identityMap.b2b_account"),
        ({"ecid": [{"id": "1"}]}, "identityMap.b2b_account"),
        ({"b2b_account": []}, "identityMap.b2b_account"),
        ({"b2b_account": "001A"}, "identityMap.b2b_account"),
        ({"b2b_account": [{"primary": True}]}, "identityMap.b2b_account[0].id"),
        ([], "identityMap"),
    ],
)
def test_an_identity_namespace_without_a_usable_id_is_refused(
    identity_map: object, field: str
) -> None:
    mapping = AepMapping(identity_namespace="b2b_account")

    with pytest.raises(Rejected) as refused:
        changes_from_aep(profile(identityMap=identity_map), active=ACTIVE, mapping=mapping, now=NOW)

    assert refused.value.field == field


def test_with_an_identity_namespace_the_attribute_is_not_read() -> None:
    mapping = AepMapping(identity_namespace="b2b_account")
    document = profile(identityMap={"b2b_account": [{"id": "001-from-identity"}]})

    batch = changes_from_aep(document, active=ACTIVE, mapping=mapping, now=NOW)

    assert batch.changes[0].account.external_id == "001-from-identity"
