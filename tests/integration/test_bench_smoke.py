"""Every benchmark under bench/ runs in its ``--quick`` form and prints its JSON line.

A smoke test, not a timed one: it never asserts a speed, nor that a target was met (a
benchmark reports a missed target in its line and still exits 0). It asserts that each
script exits 0 and that the last line on its stdout decodes as one JSON object naming the
benchmark, with the figures the README records and values that make sense for the
quick sizes (counts equal to what was sent, rates and times positive). The fourteen
scripts run at once, each in its own process, so that the whole takes as long as the
slowest (the budget's two emulated days).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
BENCHMARKS = [
    "ingest",
    "store_upsert",
    "emulator_startup",
    "end_to_end",
    "budget",
    "scale",
    "snapshot",
    "latency",
    "readback",
    "ingest_memory",
    "files",
    "multi_readback",
    "forecast",
    "fairness",
    "fold_floor",
]
# Fifteen benchmarks at once on two shared cores: the bound only catches a hang.
TIMEOUT_SECONDS = 300
pytestmark = pytest.mark.timeout(TIMEOUT_SECONDS + 60)


@pytest.fixture(scope="module")
def outputs() -> Iterator[dict[str, tuple[int, str, str]]]:
    """Each benchmark's exit code, stdout and stderr, all run at once."""
    processes = {
        name: subprocess.Popen(
            # As bench/README.md runs them: modules of the bench package, from the root.
            [sys.executable, "-m", f"bench.{name}", "--quick"],
            cwd=REPOSITORY,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in BENCHMARKS
    }
    results = {}
    try:
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
            results[name] = (process.returncode, stdout, stderr)
        yield results
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


def figures(outputs: dict[str, tuple[int, str, str]], name: str) -> dict[str, Any]:
    code, stdout, stderr = outputs[name]
    assert code == 0, f"bench/{name}.py exited {code}: {stderr[-2000:]}"
    lines = stdout.strip().splitlines()
    assert lines, f"bench/{name}.py printed nothing on stdout"
    line = json.loads(lines[-1])
    assert isinstance(line, dict)
    assert line["bench"] == name
    assert line["machine"]["nproc"] >= 1
    assert line["machine"]["python"].startswith("3.")
    return line


def test_ingest(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "ingest")
    assert line["changes"] == 20_000
    assert line["statuses"] == {"202": 10}
    assert line["changes_per_second"] > 0
    assert line["raw_upsert_rows_per_second"] > 0
    assert line["ratio"] > 0
    assert line["big_body_changes"] > 0
    assert isinstance(line["target_met"], bool)


def test_store_upsert(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "store_upsert")
    assert line["rows"] == 20_000
    for key in ("raw_upsert", "append", "fold", "append_and_fold"):
        assert line[f"{key}_rows_per_second"] > 0
    assert line["plan_batch_ms"] >= 0


def test_emulator_startup(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "emulator_startup")
    assert line["runs"] == 2
    assert 0 < line["min_seconds"] <= line["median_seconds"] <= line["max_seconds"]


def test_end_to_end(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "end_to_end")
    assert line["accounts"] == 2_000
    # Acknowledged means on the list: every account reached Demandbase.
    assert line["list_members"] == 2_000
    assert line["accounts_per_second"] > 0
    assert line["cpu_us_per_account"] > 0
    assert line["throttled"] == 0


def test_budget(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "budget")
    assert line["days"] == 2
    assert len(line["jobs_per_day"]) == 2
    assert line["jobs_per_day_allowed"] <= line["jobs_per_day_quota"] == 20
    assert 0 <= line["share_min"] <= line["share_mean"]
    assert line["overdraw"] >= line["throttled_429"] >= 0
    assert line["backlog_left"] > 0  # the backlog outlasted the budget


def test_scale(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "scale")
    assert line["audiences"] == 100
    assert line["exit_code"] == 0
    assert line["startup_seconds"] > 0
    assert 0 < line["rss_mb"] <= line["peak_rss_mb"]
    assert line["idle_cpu_percent"] >= 0


def test_snapshot(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "snapshot")
    assert line["accounts"] == 20_000
    assert line["exit_code"] == 0
    assert 0 < line["accepted_seconds"] <= line["applied_seconds"]
    assert line["rss_before_mb"] <= line["peak_rss_mb"]


def test_ingest_memory(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "ingest_memory")
    assert (line["bodies"], line["body_mib"]) == (10, 4)
    for run in ("unbounded", "bounded"):
        assert line[f"{run}_rss_before_mb"] <= line[f"{run}_peak_rss_mb"]
        assert sum(line[f"{run}_statuses"].values()) == 10
    assert line["bounded_statuses"].keys() <= {"400", "503"}  # nothing of it was stored


def test_latency(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "latency")
    assert line["changes"] == 100
    assert 0 < line["p50_ms"] <= line["p99_ms"] <= line["max_ms"]


def test_readback(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "readback")
    assert line["accounts"] == 10_000
    # The verdict found exactly the losses the benchmark made, and the ledger balances.
    assert line["lost"] == line["lost_made"] == 500
    assert line["verified"] == 9_500
    assert line["extra_removed"] == 100
    assert line["ledger_balanced"] is True
    assert line["judge_seconds"] > 0
    assert line["ingest_commit_idle_p50_ms"] > 0
    assert line["ingest_commits_during"] >= 1


def test_files(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "files")
    assert (line["rows"], line["exit_code"]) == (20_000, 0)
    assert 0 < line["applied_seconds"] <= line["folded_seconds"]
    assert line["applied_rows_per_second"] > 0
    assert line["rss_before_mb"] <= line["peak_rss_mb"]


def test_multi_readback(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "multi_readback")
    assert (line["audiences"], line["members"], line["day_seconds"]) == (20, 200, 60.0)
    assert 0 <= line["verified_within_day_share"] <= 1
    assert line["verified_total"] <= 20
    assert line["export_jobs"] >= 1
    assert 1 <= line["lists_per_export_max"] <= 20
    assert line["export_bytes"] > 0
    assert {"verified_target_met", "exports_target_met", "volume_target_met"} <= line.keys()
    # The daemon ran in its own process, its store was read from outside, its status
    # agrees with the store, and it drained cleanly.
    assert line["daemon_cpu_seconds"] > 0
    assert line["store_reads"] >= 1
    assert line["status_verified"] == line["verified_total"]
    assert line["daemon_exit_code"] == 0


def test_forecast(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "forecast")
    assert (line["audiences"], line["jobs"]) == (1_000, 20_000)
    # 20,000 jobs at 1,176 a day from noon: the shipped and the whole simulation agree.
    assert line["destination_days"] == line["full_simulation_days"] == 17
    assert line["audience_window_difference_max"] <= 1
    assert line["forecast_ms"] > 0
    assert line["full_simulation_ms"] > 0


def test_fairness(outputs: dict[str, tuple[int, str, str]]) -> None:
    line = figures(outputs, "fairness")
    assert (line["audiences"], line["large"], line["refreshed"]) == (100, 5, 10)
    # Every audience had its turn: a first job acknowledged.
    assert (line["audiences_served"], line["audiences_missing"]) == (100, 0)
    assert 0 < line["wait_median_seconds"] <= line["wait_p99_seconds"] <= line["wait_max_seconds"]
    assert line["bound_seconds"] > 0
    assert line["jobs_acked"] >= 100
    assert line["exit_code"] == 0
    assert isinstance(line["bound_target_met"], bool)
