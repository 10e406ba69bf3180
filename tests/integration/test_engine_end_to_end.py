"""The sync engine end to end: four audiences fed the four ways a CDP can, adds then removes.

Everything is real but Demandbase: the ingest server on loopback, the SQLite store,
the actors and the budget, the client speaking HTTP to the emulator. The verdict is
the emulator's true list contents against the store's desired state.
"""

from __future__ import annotations

from pathlib import Path

from dbsync.model import Account
from dbsync.testing import AudienceConfig, aep_profile, running_engine, strangers

NATIVE = AudienceConfig("e2e-native", "High-intent EMEA accounts", max_records=25)
AEP = AudienceConfig("e2e-aep", "Open opportunities, North America", max_records=25)
# The snapshots below remove most of their audiences on purpose: the guard off.
CSV = AudienceConfig("e2e-csv", "Expansion targets", max_records=25, max_removal_percent=100)
NDJSON = AudienceConfig("e2e-ndjson", "Renewals at risk", max_records=25, max_removal_percent=100)
NOT_ACTIVATED = "segment-activated-elsewhere"


def ids(accounts: list[Account]) -> set[str]:
    return {a.external_id for a in accounts}


async def test_four_audiences_fed_four_ways_end_equal_to_their_desired_state(
    tmp_path: Path,
) -> None:
    """1. Adds: NDJSON changes (with 3 accounts the tenant does not know), AEP profiles
    (realized and existing; each also names an audience not activated here), a CSV
    snapshot and an NDJSON snapshot. Wait until every list equals its desired state.
    2. Removes: NDJSON changes, AEP "exited", and second snapshots that drop some
    members and add others. Wait again.
    Result: after each step the store's desired state is what the CDP said, and each
    emulator list holds exactly its desired members that the tenant knows: the unknown
    accounts are desired but ignored by Demandbase, the other audience is nowhere."""
    async with running_engine(tmp_path, [NATIVE, AEP, CSV, NDJSON]) as engine:
        pool = await engine.tenant_accounts(200)
        native, aep, csv, ndjson = (pool[i * 40 : (i + 1) * 40] for i in range(4))
        unknown = strangers(3)

        await engine.cdp.changes([(NATIVE.id, a, True) for a in [*native, *unknown]])
        answer = await engine.cdp.aep(
            [aep_profile(a, {AEP.id: "realized", NOT_ACTIVATED: "realized"}) for a in aep[:30]]
            + [aep_profile(a, {AEP.id: "existing"}) for a in aep[30:]]
        )
        assert answer["audiences_ignored"] == {NOT_ACTIVATED: 30}
        await engine.cdp.snapshot(CSV.id, csv)
        await engine.cdp.snapshot(NDJSON.id, ndjson, media="ndjson")
        await engine.wait_settled()

        desired = {
            NATIVE.id: ids(native) | ids(unknown),
            AEP.id: ids(aep),
            CSV.id: ids(csv),
            NDJSON.id: ids(ndjson),
        }
        for audience_id, members in desired.items():
            assert await engine.store.desired_members(audience_id) == members
        lists = await engine.lists()
        assert lists[NATIVE.list] == ids(native), "rows the tenant does not know are ignored"
        assert await engine.store.desired_members(NOT_ACTIVATED) == set()
        assert set(lists) == {a.list for a in engine.audiences}

        newcomers = pool[160:]
        await engine.cdp.changes([(NATIVE.id, a, False) for a in [*native[:10], unknown[0]]])
        await engine.cdp.aep([aep_profile(a, {AEP.id: "exited"}) for a in aep[::4]])
        csv_answer = await engine.cdp.snapshot(CSV.id, [*csv[15:], *newcomers[:20]])
        assert (csv_answer["added"], csv_answer["removed"]) == (20, 15)
        ndjson_answer = await engine.cdp.snapshot(
            NDJSON.id, [*ndjson[:-5], *newcomers[20:]], media="ndjson"
        )
        assert (ndjson_answer["added"], ndjson_answer["removed"]) == (20, 5)
        await engine.wait_settled()

        desired = {
            NATIVE.id: ids(native[10:]) | ids(unknown[1:]),
            AEP.id: ids(aep) - ids(aep[::4]),
            CSV.id: ids(csv[15:]) | ids(newcomers[:20]),
            NDJSON.id: ids(ndjson[:-5]) | ids(newcomers[20:]),
        }
        lists = await engine.lists()
        for audience in engine.audiences:
            assert await engine.store.desired_members(audience.id) == desired[audience.id]
            assert lists[audience.list] == await engine.expected_members(audience.id)
        assert lists[NATIVE.list] == ids(native[10:])
