"""``dbsync run`` and ``dbsync demo`` as an operator runs them: real processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def dbsync(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbsync", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_demo_delivers_every_audience_through_429s_and_drops_and_exits_0() -> None:
    """1. dbsync demo: emulator, daemon, NDJSON + AEP + CSV feeds and AEP files in the
       watched folder, then removals, under
    a 429 storm and 5% silent row loss that read-backs find and repair.
    Result: exit 0, every audience's list matches its desired state, and the 429s and
    the losses really happened (the test fails if either stops being injected)."""
    result = dbsync("demo", "--accounts", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.endswith("verdict"))
    rows = [line for line in lines[header + 1 :] if line.startswith("demo-")]
    assert len(rows) == 4, result.stdout
    assert all(line.endswith("matches") for line in rows), result.stdout
    assert any("AEP file exports" in line for line in rows), result.stdout
    assert "progress at" in result.stdout
    summary = re.search(
        r"met (\d+) answers 429 while delivering; read-backs found (\d+) rows lost"
        r" and sent (\d+) again",
        result.stdout,
    )
    assert summary is not None, result.stdout
    throttled, lost, repaired = (int(group) for group in summary.groups())
    assert throttled > 0, result.stdout
    assert lost > 0, result.stdout
    assert repaired > 0, result.stdout
    assert re.search(r"dbsync demo: ok in \d+\.\d s", result.stdout), result.stdout
    assert "Traceback" not in result.stderr


def test_run_with_an_invalid_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[daemon]\ndrain_secnds = 3\n")
    result = dbsync("run", "--config", str(config))
    assert result.returncode == 78
    assert "daemon.drain_secnds" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_the_production_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "systemd" / "config.example.toml"
    result = dbsync("check-config", "--config", str(example))
    assert result.returncode == 0, result.stderr
