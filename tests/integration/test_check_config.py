"""``dbsync check-config`` as an operator runs it: a process, an exit code, one message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbsync import __version__
from dbsync.exitcodes import ExitCode

REPO = Path(__file__).resolve().parents[2]

GOOD = """
[[destinations]]
name = "tenant"
credentials = { token = { file = "token" } }

[[destinations.audiences]]
id = "a1"
name = "Audience one"
origin = "segmentation"

[[destinations.audiences]]
id = "a2"
name = "Audience two"
origin = "segmentation"
"""


def dbsync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dbsync ARGS`` from the repository, outside systemd."""
    base = {
        k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY", "DBSYNC_CONFIG")
    }
    result = subprocess.run(
        [sys.executable, "-m", "dbsync", *args],
        cwd=REPO,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "token").touch(mode=0o600)
    (tmp_path / "token").write_text("not-a-real-token\n")
    return tmp_path


def test_version() -> None:
    result = dbsync("--version")

    assert result.returncode == ExitCode.OK
    assert result.stdout.strip() == f"dbsync {__version__}"


def test_secret_file_readable_by_others_exits_78_like_ssh(config_dir: Path) -> None:
    path = config_dir / "config.toml"
    path.write_text(GOOD)
    (config_dir / "token").chmod(0o644)

    result = dbsync("check-config", "--config", str(path))

    assert result.returncode == ExitCode.CONFIG
    assert (
        f"destinations[0].credentials.token.file: permissions 0644 for {config_dir / 'token'}"
        " are too open" in result.stderr
    )
    assert "not-a-real-token" not in result.stderr


@pytest.mark.usefixtures("private_dev_credentials")
def test_shipped_config_is_valid() -> None:
    result = dbsync("check-config", "--config", "config.toml")

    assert result.returncode == ExitCode.OK, result.stderr
    assert result.stdout == "config.toml: ok (1 destination(s), 3 audience(s))\n"
    assert result.stderr == ""


def test_good_config_prints_one_line_summary(config_dir: Path) -> None:
    path = config_dir / "config.toml"
    path.write_text(GOOD)

    result = dbsync("check-config", "--config", str(path))

    assert result.returncode == ExitCode.OK, result.stderr
    assert result.stdout == f"{path}: ok (1 destination(s), 2 audience(s))\n"


def test_config_path_from_the_environment(config_dir: Path) -> None:
    path = config_dir / "config.toml"
    path.write_text(GOOD.replace("[[destinations]]", "colour = 1\n[[destinations]]", 1))

    result = dbsync("check-config", env={"DBSYNC_CONFIG": str(path)})

    assert result.returncode == ExitCode.CONFIG
    assert "colour: unknown key" in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace('origin = "segmentation"', 'origin = "custom_upload"', 1),
            "destinations[0].audiences[0].origin: custom CSV uploads cannot be activated",
        ),
        (
            GOOD.replace("[[destinations]]", "[daemon]\ndrain_secnds = 5\n[[destinations]]"),
            "daemon.drain_secnds: unknown key; did you mean `drain_seconds`?",
        ),
        (
            GOOD.replace('"token" }', '"absent" }'),
            "destinations[0].credentials.token.file: cannot read secret",
        ),
        (GOOD + "[oops", "not valid TOML"),
        ("", "destinations: no destination: at least one [[destinations]] table is required"),
        (
            GOOD.replace(
                "[[destinations]]", "[daemon]\nsummary_interval_seconds = 1e-300\n[[destinations]]"
            ),
            "daemon.summary_interval_seconds: expected `float` >= 1.0; allowed: from 1 to 86400",
        ),
        (
            GOOD + "[destinations.delivery]\nbacklog_eta_warn_hours = 0\n",
            "destinations[0].delivery.backlog_eta_warn_hours: expected `float` > 0.0;"
            " allowed: above 0 to 8760",
        ),
        (
            GOOD.replace('name = "tenant"', 'name = "tenant"\nbase_url = "http://db.example"'),
            "destinations[0].base_url: http:// to db.example would send the bearer token in clear",
        ),
    ],
    ids=[
        "custom-upload",
        "typo",
        "missing-secret",
        "toml-syntax",
        "empty-file",
        "summary-flood",
        "no-warn-hours",
        "plaintext-remote",
    ],
)
def test_bad_config_exits_78_naming_the_key(config_dir: Path, text: str, expected: str) -> None:
    path = config_dir / "config.toml"
    path.write_text(text)

    result = dbsync("check-config", "--config", str(path))

    assert result.returncode == ExitCode.CONFIG
    assert result.stdout == ""
    assert f"dbsync: invalid configuration {path}: " in result.stderr
    assert expected in result.stderr
    assert "not-a-real-token" not in result.stderr


def test_non_utf8_file_exits_78_naming_the_file_and_the_byte(config_dir: Path) -> None:
    path = config_dir / "config.toml"
    # Latin-1 "é" in a comment on the third line: a file saved by the wrong editor.
    path.write_bytes(
        GOOD.encode().replace(b"\n[[destinations]]", b"\n# caf\xe9\n[[destinations]]", 1)
    )

    result = dbsync("check-config", "--config", str(path))

    assert result.returncode == ExitCode.CONFIG
    assert result.stdout == ""
    offset = GOOD.index("\n[[destinations]]") + len("\n# caf")
    assert result.stderr == (
        f"dbsync: invalid configuration {path}: not UTF-8 text:"
        f" byte 0xe9 at offset {offset} (line 2, column 6)\n"
    )


def test_missing_file_exits_78_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    result = dbsync("check-config", "--config", str(path))

    assert result.returncode == ExitCode.CONFIG
    assert f"cannot read {path}" in result.stderr


def test_systemd_credential_outside_the_service_is_noted(config_dir: Path) -> None:
    path = config_dir / "config.toml"
    path.write_text(GOOD.replace('file = "token"', 'credential = "demandbase-token"'))

    result = dbsync("check-config", "--config", str(path))

    assert result.returncode == ExitCode.OK
    assert "destinations[0].credentials.token.credential" in result.stderr
    assert "not checked" in result.stderr

    result = dbsync(
        "check-config", "--config", str(path), env={"CREDENTIALS_DIRECTORY": str(config_dir)}
    )

    assert result.returncode == ExitCode.CONFIG
    assert "destinations[0].credentials.token.credential: cannot read secret" in result.stderr
