"""A real daemon behind a hostile Demandbase: the token is searched for everywhere.

Issue 10, item 2: a same-origin redirect loop once put the bearer token into the
``actor_crashed`` log line, ``dbsync ctl status`` and the SQLite WAL. Here a daemon
meets a redirect loop (the short form, in the default run), then every failure of
tests/support/hostile.py plus TLS to a plain-HTTP port, until its audiences are
``failed`` with their reason stored; then the token and the redirect's signature are
searched for in every log record (formatted with its traceback), in ``dbsync ctl
status --json``, in the SQLite file and in its WAL, as bytes.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp
import msgspec
import pytest

from dbsync import retry
from dbsync.logs import JsonFormatter
from dbsync.model import Account
from dbsync.states import AudienceState
from dbsync.testing import (
    AudienceConfig,
    Cdp,
    build_config,
    config_toml,
    running_daemon,
    wait_until,
)
from dbsync.testing.config import DATABASE_NAME
from tests.support.hostile import MODES, SIGNATURE, HostileDemandbase, hostile_demandbase

pytestmark = pytest.mark.reliability

TOKEN = "dbtok-hQljGMChsKMevsmZhXckh3Nj-never-print-me"
SECRETS = (TOKEN, SIGNATURE, "sig-5b1e7c")
TIMEOUT_SECONDS = 0.5  # the daemon's request timeout: silence is waited out that long
WAIT = 30.0
ACCOUNT = Account(external_id="ACC-1", name="Acme", domain="acme.example")


def leaks(data: bytes) -> list[str]:
    return [secret for secret in SECRETS if secret.encode() in data]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A state directory short enough for the admin socket's 107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="dbx-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write_config(directory: Path, hostile: HostileDemandbase, *, tls: bool) -> Path:
    """A destination on the hostile server; with ``tls``, one more over https:// to it."""
    urls = {"plain": hostile.url, **({"tls": hostile.tls_url} if tls else {})}
    configs = [
        build_config(
            directory,
            url,
            [AudienceConfig(f"leak-{name}")],
            destination={"name": name, "request_timeout_seconds": TIMEOUT_SECONDS},
        )
        for name, url in urls.items()
    ]
    (directory / "emulator-token").write_text(TOKEN + "\n")  # build_config made it 0600
    config = msgspec.structs.replace(
        configs[0], destinations=tuple(c.destinations[0] for c in configs)
    )
    path = directory / "config.toml"
    path.write_text(config_toml(config))
    return path


async def ctl_status_json(sock: Path) -> bytes:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "dbsync", "ctl", "--socket", str(sock), "--json", "status"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err
    return out + err


@pytest.mark.parametrize(
    ("modes", "tls"),
    [pytest.param(("loop",), False, id="redirect-loop"), pytest.param(MODES, True, id="all")],
)
async def test_the_token_is_nowhere_after_a_hostile_demandbase(
    short_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    modes: Sequence[str],
    tls: bool,
) -> None:
    """1. A daemon whose destination is the hostile server answering ``modes`` in turn
    (a same-origin redirect loop alone, or all its failures), and with ``tls`` a second
    destination over https:// to the same plain-HTTP port.
    2. One change for each audience; retries within milliseconds (the backoff's
    constants), so that each audience is ``failed`` soon, its reason stored.
    Result: every failure was met with the token sent and no redirect followed; the
    token and the signature are in no log record, not in ``ctl status --json``, not
    in the database nor its WAL."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(retry, "BACKOFF_BASE_SECONDS", 0.01)
    monkeypatch.setattr(retry, "BACKOFF_MAX_SECONDS", 0.02)
    audiences = ["leak-plain", *(["leak-tls"] if tls else [])]
    async with hostile_demandbase(modes) as hostile:
        config = write_config(short_dir, hostile, tls=tls)
        async with running_daemon(config) as daemon:
            assert daemon.ingest_address is not None
            assert daemon.store is not None
            assert daemon.config is not None
            store = daemon.store
            host, port = daemon.ingest_address
            async with aiohttp.ClientSession() as http:
                cdp = Cdp(http, f"http://{host}:{port}")
                for audience in audiences:
                    await cdp.changes([(audience, ACCOUNT, True)])

            async def all_failed() -> bool:
                records = await store.audiences()
                return all(records[a].state is AudienceState.FAILED for a in audiences)

            await wait_until(
                lambda: (
                    all(hostile.answered[m] for m in modes)
                    and (hostile.tls_handshakes > 0 or not tls)
                ),
                WAIT,
                what="every failure met",
            )
            await wait_until(all_failed, WAIT, what="every audience failed")
            status = await ctl_status_json(daemon.config.daemon.admin_socket)

    assert set(hostile.authorizations) == {f"Bearer {TOKEN}"}
    assert hostile.followed == 0
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records).encode()
    assert b"not followed" in logged or b"no complete answer" in logged
    assert leaks(logged) == []
    assert b"leak-plain" in status
    assert b"not followed" in status or b"no complete answer" in status
    assert leaks(status) == []
    state = short_dir / "state"
    stored = b"".join(
        path.read_bytes()
        for path in (state / DATABASE_NAME, state / f"{DATABASE_NAME}-wal")
        if path.exists()
    )
    assert b"not followed" in stored or b"no complete answer" in stored
    assert leaks(stored) == []
