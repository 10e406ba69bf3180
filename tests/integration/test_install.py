"""packaging/install.sh, run for real into a temporary root (``--root DIR``).

It builds the wheel from this checkout and a virtual environment from the runtime lock
(about 10 s each time), as an administrator's ``sudo packaging/install.sh`` does; only
systemd itself is left alone. The tests then read the installed units and check that
every command they run is where the install put it, that ``systemd-analyze`` accepts
them and scores them "OK", that the installed ``dbsync`` runs, that a second run keeps
an operator's configuration, and that an uninstall keeps configuration and state.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbsync import __version__

CHECKOUT = Path(__file__).resolve().parents[2]
SCRIPT = CHECKOUT / "packaging" / "install.sh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
UNIT_DIR = Path("usr/lib/systemd/system")
UNITS = ("dbsync.service", "dbsync@.service")
# What systemd-analyze security calls "OK" (its scale runs from 0, safe, to 10).
EXPOSURE_OK = 2.0
# Each install runs pip (about 10 s alone, several times that on a busy machine).
pytestmark = pytest.mark.timeout(180)
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not here"
)


def install(*args: str, python: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if python is not None:
        env["PYTHON"] = python
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd="/",
    )


def install_into(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = install("--root", str(root), *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One install, shared by the tests that only read it."""
    directory = tmp_path_factory.mktemp("root")
    install_into(directory)
    return directory


def inside(root: Path, path: str) -> Path:
    """``path`` of the target system, found under ``root``: links resolve within it."""
    here = root / path.lstrip("/")
    for _ in range(10):
        if not here.is_symlink():
            return here
        target = os.readlink(here)
        here = root / target.lstrip("/") if target.startswith("/") else here.parent / target
        here = Path(os.path.normpath(here))
        assert here.is_relative_to(root), f"{path} leads out of {root}"
    raise AssertionError(f"{path}: too many links under {root}")


def directives(unit: Path, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", unit.read_text(), re.MULTILINE)


def commands(unit: Path) -> list[str]:
    """The program of each ExecStartPre=, ExecStart= and ExecReload= line."""
    lines = [
        line
        for key in ("ExecStartPre", "ExecStart", "ExecReload")
        for line in directives(unit, key)
    ]
    # A command may carry systemd's prefixes (-, @, +, !, :) before its path.
    return [line.split()[0].lstrip("-@+!:") for line in lines]


@pytest.mark.parametrize("unit", UNITS)
def test_every_command_of_the_installed_units_is_installed_and_executable(
    root: Path, unit: str
) -> None:
    installed = root / UNIT_DIR / unit
    programs = commands(installed)
    assert len(programs) == 3, installed.read_text()
    for program in programs:
        assert program.startswith("/"), program
        found = inside(root, program)
        assert found.is_file(), f"{unit} runs {program}, which the install did not put there"
        assert os.access(found, os.X_OK), found
        # The link leads into the virtual environment, not to some other dbsync.
        assert found == root / "opt/dbsync/bin/dbsync", found
    # ExecReload= is `dbsync ctl ... reload`, so that `systemctl reload` applies a config.
    (reload,) = directives(installed, "ExecReload")
    assert reload.split()[1] == "ctl", reload
    assert reload.split()[-1] == "reload", reload


def test_the_rest_lands_where_systemd_and_the_units_look(root: Path) -> None:
    assert (root / "usr/lib/sysusers.d/dbsync.conf").read_text() == (
        CHECKOUT / "systemd/dbsync.sysusers.conf"
    ).read_text()
    assert (
        "d /etc/credstore.encrypted 0700 root root"
        in (root / "usr/lib/tmpfiles.d/dbsync.conf").read_text()
    )
    config = root / "etc/dbsync/config.toml"
    assert config.read_text() == (CHECKOUT / "systemd/config.example.toml").read_text()
    # The configuration is the daemon's group's to read, nobody else's.
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    for unit in UNITS:
        (documentation,) = directives(root / UNIT_DIR / unit, "Documentation")
        assert documentation.startswith("file:///"), documentation
        assert inside(root, documentation.removeprefix("file://")).is_file(), documentation
    for config_file in ("config.example.toml", "config.reference.toml"):
        assert (root / "usr/share/doc/dbsync" / config_file).is_file()
    # Nothing of the build is left beside the installed environment.
    assert sorted(p.name for p in (root / "opt").iterdir()) == ["dbsync"]


def test_the_installed_dbsync_runs_from_its_own_environment(root: Path) -> None:
    for command in ("opt/dbsync/bin/dbsync", "usr/bin/dbsync"):
        ran = subprocess.run(
            [str(root / command), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == f"dbsync {__version__}"
    where = subprocess.run(
        [str(root / "opt/dbsync/bin/python"), "-c", "import dbsync; print(dbsync.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert Path(where.stdout.strip()).is_relative_to(root / "opt/dbsync/lib"), where.stdout
    # The scripts pip wrote name the target system's path, not the build's.
    shebang = (root / "opt/dbsync/bin/pip").read_text().splitlines()[0]
    assert re.fullmatch(r"#!/opt/dbsync/bin/python[\d.]*", shebang), shebang


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("unit", "name"), [(UNITS[0], UNITS[0]), (UNITS[1], "dbsync@acme.service")]
)
def test_systemd_accepts_the_installed_units_and_scores_them_ok(
    root: Path, unit: str, name: str, tmp_path: Path
) -> None:
    # verify resolves its commands on this machine: each one is pointed at the installed
    # file under the root (the same path, prefixed), so a command that the install did
    # not put where the unit says fails it. Nothing else of the unit changes.
    text = (root / UNIT_DIR / unit).read_text()
    rewritten = tmp_path / name
    rewritten.write_text(text.replace("/usr/bin/dbsync", f"{root}/usr/bin/dbsync"))
    assert "/usr/bin/dbsync" in text
    verified = analyze("verify", str(rewritten))
    assert verified.returncode == 0, verified.stderr
    assert name not in verified.stderr, verified.stderr

    # security reads the installed unit itself, from the root.
    security = analyze("security", "--offline=true", f"--root={root}", name)
    assert security.returncode == 0, security.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", security.stdout)
    assert found is not None, security.stdout
    assert float(found[1]) <= EXPOSURE_OK, security.stdout
    assert found[2] == "OK", security.stdout


def test_a_second_run_upgrades_in_place_and_an_uninstall_keeps_config_and_state(
    tmp_path: Path,
) -> None:
    install_into(tmp_path)
    config = tmp_path / "etc/dbsync/config.toml"
    edited = config.read_text().replace('level = "info"', 'level = "debug"')
    config.write_text(edited)
    state = tmp_path / "var/lib/dbsync/dbsync.sqlite3"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"the daemon's state")
    marker = tmp_path / "opt/dbsync/left-by-the-old-venv"
    marker.touch()

    again = install_into(tmp_path)

    assert config.read_text() == edited
    assert "kept" in again.stdout
    # A new environment replaced the old one whole, and it runs.
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "opt").iterdir()) == ["dbsync"]
    ran = subprocess.run(
        [str(tmp_path / "usr/bin/dbsync"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert ran.stdout.strip() == f"dbsync {__version__}"

    gone = install_into(tmp_path, "--uninstall")

    for path in (
        "opt/dbsync",
        "usr/bin/dbsync",
        "usr/lib/systemd/system/dbsync.service",
        "usr/lib/systemd/system/dbsync@.service",
        "usr/lib/sysusers.d/dbsync.conf",
        "usr/lib/tmpfiles.d/dbsync.conf",
        "usr/share/doc/dbsync",
    ):
        assert not (tmp_path / path).exists(), path
        assert not (tmp_path / path).is_symlink(), path
    assert config.read_text() == edited
    assert state.read_bytes() == b"the daemon's state"
    assert "Kept" in gone.stdout
    assert "/etc/dbsync" in gone.stdout
    assert "/var/lib/dbsync" in gone.stdout


@pytest.fixture
def fake_python() -> Iterator[Path]:
    """An interpreter that says it is too old, or that it cannot make a venv."""
    directory = Path(tempfile.mkdtemp(prefix="dbsync-python-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def fake(directory: Path, fails_on: str) -> Path:
    path = directory / f"python-{fails_on}"
    path.write_text(f'#!/bin/sh\ncase "$*" in *{fails_on}*) exit 1;; esac\nexit 0\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("fails_on", "message"),
    [("version_info", "needs Python >= 3.11"), ("ensurepip", "apt-get install python3-venv")],
)
def test_it_refuses_an_interpreter_that_cannot_run_dbsync(
    fake_python: Path, tmp_path: Path, fails_on: str, message: str
) -> None:
    refused = install("--root", str(tmp_path), python=str(fake(fake_python, fails_on)))

    assert refused.returncode != 0
    assert message in refused.stderr, refused.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv is not here")
def test_it_refuses_to_install_into_the_system_without_root(fake_python: Path) -> None:
    # A copy that the unprivileged user can read: the check comes before anything else.
    copy = fake_python / "install.sh"
    shutil.copy(SCRIPT, copy)
    fake_python.chmod(0o755)
    copy.chmod(0o755)
    command = ["bash", str(copy)]
    if os.geteuid() == 0:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    refused = subprocess.run(
        command, capture_output=True, text=True, timeout=30, check=False, cwd="/"
    )

    assert refused.returncode != 0
    assert "run as root" in refused.stderr, refused.stderr
