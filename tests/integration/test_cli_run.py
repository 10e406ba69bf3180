"""``dbsync run`` and ``dbsync demo`` as an operator runs them: real processes."""

from __future__ import annotations

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


def test_the_demo_delivers_every_audience_and_exits_0() -> None:
    """1. dbsync demo: emulator, daemon, NDJSON + AEP + CSV feeds, then removals.
    Result: exit 0 and every audience's list equals its desired state."""
    result = dbsync("demo", "--accounts", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("demo-")]
    assert len(rows) == 3
    assert all(line.endswith("equal") for line in rows), result.stdout
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
