"""The state directory is 0700 and the SQLite files 0600, whatever the umask (issue 10, 9).

Under the unit, StateDirectoryMode= and UMask= see to it; run by hand with umask 022
the directory came out 0755 and the database, which holds every account of every
audience, 0644.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbsync.clock import SystemClock
from dbsync.daemon import DATABASE_NAME
from dbsync.model import Account, Change
from dbsync.store import Store
from dbsync.testing import AudienceConfig, running_daemon, running_emulator, write_config

ACCOUNT = Account(external_id="ACC-1", name="n", domain="d.example")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def sqlite_files(state: Path) -> list[Path]:
    return [state / f"{DATABASE_NAME}{suffix}" for suffix in ("", "-wal", "-shm")]


async def test_a_new_store_is_private_under_umask_022(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with umask(0o022):
        async with Store.open(state / DATABASE_NAME, clock=SystemClock()) as store:
            await store.append_changes(
                [Change(audience_id="a", account=ACCOUNT, member=True, ts=1.8e9)]
            )
            files = sqlite_files(state)
            assert all(f.exists() for f in files)
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    assert mode(state) == 0o700


async def test_files_left_open_to_others_are_narrowed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with Store.open(state / DATABASE_NAME, clock=SystemClock()):
        pass
    state.chmod(0o755)
    (state / DATABASE_NAME).chmod(0o644)

    with umask(0o022):
        async with Store.open(state / DATABASE_NAME, clock=SystemClock()):
            assert mode(state / DATABASE_NAME) == 0o600
            assert mode(state / f"{DATABASE_NAME}-wal") == 0o600
    assert mode(state) == 0o755  # an existing directory is the operator's


@pytest.fixture
def short_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="dbm-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_daemon_run_by_hand_under_umask_022_keeps_its_state_private(
    short_dir: Path,
) -> None:
    """The probe's case: the admin socket elsewhere (absolute), umask 022."""
    async with running_emulator() as emulator:
        config = write_config(
            short_dir,
            emulator.url,
            [AudienceConfig("modes")],
            daemon={"admin_socket": short_dir / "admin.sock"},
        )
        with umask(0o022):
            async with running_daemon(config):
                state = short_dir / "state"
                assert mode(state) == 0o700
                assert [mode(f) for f in sqlite_files(state)] == [0o600] * 3
