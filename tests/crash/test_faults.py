"""Connections that Demandbase drops after a request took effect lose nothing.

A dropped answer is the client's worst case: the job was created, the upload was
taken, but no answer came. The daemon must find out what happened rather than assume:
an upload repeated on a job that already runs is refused (400, "data goes to a new
job, once"), and that refusal says nothing about the rows it carries.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from dbsync.demandbase.emulator import Emulator, Faults
from tests.crash.harness import (
    AUDIENCES,
    Cdp,
    assert_settled_store,
    daemon_process,
    difference,
    emulator_lists,
    emulator_settings,
    free_port,
    ndjson_request,
    read_store,
    tenant_accounts,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.crash

# Retries back off exponentially from 1 s: a call that meets four dropped answers in
# a row waits 8-16 s before its fifth try. Rare, but it must not fail the test.
CONVERGE_SECONDS = 45.0


@pytest.mark.timeout(120)
async def test_answers_dropped_after_the_upload_took_effect_reject_nothing(
    tmp_path: Path,
) -> None:
    """1. Demandbase drops the connection of 15 % of requests after they took effect
       (job created, upload taken, status read), without an answer.
    2. The daemon sends one account per job (max_records 1): 9 joins per audience;
       wait until every list holds them.
    3. The CDP removes 3 of them per audience; wait until every list equals the
       desired state; SIGTERM.
    Result: no account is set aside as rejected, every removal reaches its list, exit
    0 with a settled store and a balanced ledger.
    """
    settings = emulator_settings(Faults(latency_ms=5.0, reset_ratio=0.15))
    emulator = Emulator(settings)
    pool = tenant_accounts(emulator, 9)
    ingest_port = free_port()
    ingest = f"http://127.0.0.1:{ingest_port}"
    config = tmp_path / "config.toml"
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        emulator.serve(host="127.0.0.1", port=0) as base_url,
        aiohttp.ClientSession(connector=connector) as session,
        daemon_process(config) as daemon,
    ):
        write_config(
            config,
            base_url=base_url,
            token=settings.token,
            ingest_port=ingest_port,
            max_records=1,
        )
        cdp = Cdp(session, ingest)
        await daemon.start()
        await daemon.wait_healthy(session, ingest)

        async def lists_equal() -> bool:
            # An account set aside as rejected would never be sent again: fail at once.
            assert read_store(daemon.database).rejected == 0, report()
            return emulator_lists(emulator) == cdp.desired.members

        def report() -> str:
            view = read_store(daemon.database)
            return (
                f"{difference(cdp.desired.members, emulator_lists(emulator))};"
                f" rejected {view.rejected}, dirty {view.dirty}\n{daemon.logs()}"
            )

        joins = [(audience, a, True) for audience, _ in AUDIENCES for a in pool]
        assert await cdp.send(ndjson_request(joins, "joins"))
        await wait_until(lists_equal, CONVERGE_SECONDS, report)
        leaves = [(audience, a, False) for audience, _ in AUDIENCES for a in pool[::3]]
        assert await cdp.send(ndjson_request(leaves, "leaves"))
        await wait_until(lists_equal, CONVERGE_SECONDS, report)
        returncode = await daemon.terminate()

        assert returncode == 0, daemon.logs()
        assert emulator.stats()["resets_injected"] > 0
        assert_settled_store(read_store(daemon.database), cdp)
