"""``dbsync probe`` against the emulator in each dialect: the verdicts, and the spend.

Each dialect is one reading of what Demandbase leaves undocumented; the probe must
name it in the verdict of the check it touches, say that every other check holds as
the emulator's own reading has it, and spend no more than it announced.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dbsync.config import load_config
from dbsync.contract.command import probe_destination
from dbsync.contract.probe import PLAN
from dbsync.contract.record import read_records
from dbsync.demandbase.emulator import DIALECTS, Faults
from dbsync.exitcodes import ExitCode
from dbsync.testing import ApiKeySet, AudienceConfig, fast_export_tenant, running_emulator
from dbsync.testing.config import DESTINATION, write_config

# What the probe finds against the emulator's own reading (no dialect).
BASELINE = {
    "auth": "holds",
    "A1": "holds",
    "A2": "holds",
    "A3": "holds",
    "A4": "could not tell",
    "A5": "differs",
    "refused_rows": "holds",
    "states": "holds",
    "job_answers": "holds",
    "results_url": "holds",
}
# Per dialect: the checks whose verdict changes, (outcome, names the dialect).
EXPECTED: dict[str, dict[str, tuple[str, bool]]] = {
    "list-per-job": {"A1": ("differs", True)},
    "no-list-id": {
        "A2": ("differs", True),
        "A1": ("could not tell", False),
        "A3": ("could not tell", False),
        "A5": ("could not tell", False),
    },
    "results-need-bearer": {"A3": ("differs", True)},
    "results-columns": {"A3": ("differs", True)},
    "results-url-null": {"results_url": ("differs", True)},
    "states-upper": {"states": ("differs", True)},
    "state-unknown": {"states": ("differs", True)},
    "skip-silently": {"refused_rows": ("differs", True)},
    "content-fails": {"refused_rows": ("differs", True)},
    "sparse-jobs": {"job_answers": ("differs", True)},
    "multi-list-column": {"A5": ("holds", True)},
}
STATES = {
    None: "holds",
    "list-per-job": "broken",
    "no-list-id": "degraded",
}


def test_every_dialect_has_an_expectation() -> None:
    assert set(EXPECTED) == set(DIALECTS)


async def probe(tmp_path: Path, dialect: str | None, *, yes: bool = True) -> tuple[int, dict]:
    dialects = frozenset({dialect}) if dialect else frozenset()
    tenant = fast_export_tenant(job_delay_seconds=0.05, faults=Faults(dialects=dialects))
    async with running_emulator(tenant) as emulator:
        path = write_config(tmp_path, emulator.url, [AudienceConfig("emea")])
        out = io.StringIO()
        code = await probe_destination(
            load_config(path),
            DESTINATION,
            yes=yes,
            as_json=True,
            out=out,
            poll_initial_seconds=0.02,
            poll_max_seconds=0.1,
        )
        document = json.loads(out.getvalue())
        return code, document


@pytest.mark.parametrize("dialect", [None, *DIALECTS])
async def test_the_probe_names_each_dialect_and_spends_within_its_plan(
    tmp_path: Path, dialect: str | None
) -> None:
    code, document = await probe(tmp_path, dialect)
    verdicts = {v["check"]: v for v in document["verdicts"]}
    expected = {check: (outcome, False) for check, outcome in BASELINE.items()}
    expected.update(EXPECTED.get(dialect or "", {}))
    if dialect == "no-list-id":
        del expected["results_url"]  # nothing exported: nothing to say of it
    assert {c: v["outcome"] for c, v in verdicts.items()} == {
        c: outcome for c, (outcome, _) in expected.items()
    }
    for check, (_, named) in expected.items():
        assert (verdicts[check]["dialect"] == dialect) is named, verdicts[check]
    if dialect is None:
        assert verdicts["A5"]["dialect"] == ""
    # The spend is counted, and within what was announced.
    assert document["within_plan"] is True
    assert document["spent"]
    for endpoint, count in document["spent"].items():
        assert count <= document["plan"][endpoint]
    assert document["spent"]["import.create_job"] == 3
    assert document["state"] == STATES.get(dialect, "holds")
    assert code == (ExitCode.FAULT if dialect == "list-per-job" else ExitCode.OK)
    # Kept per destination, with the time.
    record = read_records(tmp_path / "state")[DESTINATION]
    assert record.state == document["state"]
    assert record.probed_at > 0


async def test_without_yes_the_probe_prints_its_plan_and_sends_nothing(tmp_path: Path) -> None:
    tenant = fast_export_tenant()
    async with running_emulator(tenant) as emulator:
        path = write_config(tmp_path, emulator.url, [AudienceConfig("emea")])
        out = io.StringIO()
        code = await probe_destination(
            load_config(path), DESTINATION, yes=False, as_json=False, out=out
        )
        assert code == ExitCode.OK
        text = out.getvalue()
        assert "dbsync probe 20" in text
        assert "--yes" in text
        for endpoint, most in PLAN.items():
            assert f"{most:>4}" in text, endpoint
        assert emulator.emulator.tenant.import_jobs == []
        assert emulator.emulator.tenant.export_jobs == []
        assert not (tmp_path / "state" / "contract.json").exists()


async def test_the_probe_leaves_one_empty_list_named_for_it(tmp_path: Path) -> None:
    tenant = fast_export_tenant()
    async with running_emulator(tenant) as emulator:
        path = write_config(tmp_path, emulator.url, [AudienceConfig("emea")])
        await probe_destination(
            load_config(path),
            DESTINATION,
            yes=True,
            as_json=True,
            out=io.StringIO(),
            poll_initial_seconds=0.02,
            poll_max_seconds=0.1,
        )
        lists = emulator.emulator.tenant.lists
        assert len(lists) == 1
        ((name, account_list),) = lists.items()
        assert name.startswith("dbsync probe 20")
        assert len(account_list) == 0


async def test_the_probe_works_with_an_api_key_set(tmp_path: Path) -> None:
    tenant = fast_export_tenant()
    async with running_emulator(tenant) as emulator:
        path = write_config(
            tmp_path,
            emulator.url,
            [AudienceConfig("emea")],
            api_key_set=ApiKeySet(),
        )
        out = io.StringIO()
        code = await probe_destination(
            load_config(path),
            DESTINATION,
            yes=True,
            as_json=True,
            out=out,
            poll_initial_seconds=0.02,
            poll_max_seconds=0.1,
        )
        assert code == ExitCode.OK
        verdicts = {v["check"]: v for v in json.loads(out.getvalue())["verdicts"]}
        assert "API key set" in verdicts["auth"]["finding"]
