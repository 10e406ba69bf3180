"""The systemd units: accepted by ``systemd-analyze verify``, scored "OK" by its security check.

The units name ``/usr/bin/dbsync``, where a package installs it; the test points them at
the ``dbsync`` this interpreter installed (``verify`` checks that the command exists)
and changes nothing else. The template is checked as one instance of it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# What systemd-analyze security calls "OK" (its scale runs from 0, safe, to 10).
EXPOSURE_OK = 2.0

pytestmark = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not here")


def installed(unit: str, name: str, directory: Path) -> Path:
    """``unit`` copied to ``directory/name``, running the dbsync this interpreter has."""
    dbsync = Path(sys.executable).parent / "dbsync"
    assert dbsync.exists(), f"{dbsync}: install the package first (pip install -e .)"
    path = directory / name
    path.write_text((UNITS / unit).read_text().replace("/usr/bin/dbsync", str(dbsync)))
    return path


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("unit", "name"),
    [("dbsync.service", "dbsync.service"), ("dbsync@.service", "dbsync@acme.service")],
)
def test_the_unit_verifies_and_its_exposure_is_ok(unit: str, name: str, tmp_path: Path) -> None:
    path = installed(unit, name, tmp_path)

    verified = analyze("verify", str(path))
    assert verified.returncode == 0, verified.stderr
    assert name not in verified.stderr, verified.stderr

    security = analyze("security", "--offline=true", str(path))
    assert security.returncode == 0, security.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", security.stdout)
    assert found is not None, security.stdout
    exposure, verdict = float(found[1]), found[2]
    assert exposure <= EXPOSURE_OK, security.stdout
    assert verdict == "OK", security.stdout


INSTANCE_KEYS = (
    "Description",
    "ExecStartPre",
    "ExecStart",
    "ExecReload",
    "StateDirectory",
    "RuntimeDirectory",
    "LoadCredentialEncrypted",
    "SyslogIdentifier",
)


def settings(unit: str) -> list[tuple[str, str]]:
    lines = (UNITS / unit).read_text().splitlines()
    return [
        (k, v)
        for k, _, v in (line.partition("=") for line in lines if re.match(r"^[A-Z]\w*=", line))
    ]


def test_the_template_keeps_every_instance_apart_and_is_hardened_alike() -> None:
    """Two tenants on one VM share nothing: config, state, runtime directory (and so
    the admin socket), credential and log identifier all carry the instance name; every
    other setting, the hardening included, is the single unit's."""
    template, single = settings("dbsync@.service"), settings("dbsync.service")
    assert [k for k, _ in template] == [k for k, _ in single]
    for (key, value), (_, single_value) in zip(template, single, strict=True):
        if key in INSTANCE_KEYS:
            assert "%i" in value, key
        else:
            assert value == single_value, key


@pytest.mark.parametrize("unit", ["dbsync.service", "dbsync@.service"])
def test_descriptors_and_memory_are_bounded_with_room_for_the_ingest_limits(unit: str) -> None:
    """LimitNOFILE well above [ingest] max_connections, MemoryMax above the measured peak."""
    from dbsync.config import IngestSettings

    text = (UNITS / unit).read_text()
    nofile = re.search(r"^LimitNOFILE=(\d+)$", text, re.MULTILINE)
    memory = re.search(r"^MemoryMax=(\d+)M$", text, re.MULTILINE)
    assert nofile is not None, text
    assert memory is not None, text

    assert int(nofile.group(1)) >= 4 * IngestSettings().max_connections
    # bench/ingest_memory.py: 533 MiB peak under the default max_body_bytes_in_flight.
    assert int(memory.group(1)) >= 2 * 533
