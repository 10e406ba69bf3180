"""``dbsync demo``: the emulator, the daemon and a synthetic feed, in one command.

It starts the bundled Demandbase emulator and a real daemon on loopback (temporary
state directory, real SQLite, real HTTP), then feeds three audiences the three ways
a CDP can: native NDJSON changes, Adobe Experience Platform profile exports, and a
full CSV snapshot; then removals the same three ways. It waits until the daemon has
nothing left in flight and compares each Demandbase list (the emulator's true
contents) with the desired state. A few accounts are unknown to the tenant on
purpose: Demandbase ignores rows that match no account, and the report names them
instead of hiding them. Exit 0 when every list equals its desired state.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import msgspec

from dbsync.daemon import Daemon
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.emulator import Emulator, EmulatorSettings
from dbsync.model import Account

__all__ = ["run"]

_AUDIENCES = (
    ("demo-emea", "High-intent EMEA accounts", "native NDJSON changes"),
    ("demo-aep", "Open opportunities, North America", "AEP profile exports"),
    ("demo-snapshot", "Expansion targets", "full CSV snapshots"),
)


def run(args: argparse.Namespace) -> int:
    import uvloop

    if args.accounts < 10:
        print("dbsync demo: --accounts must be at least 10", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_demo(args.accounts, args.seed, args.timeout_seconds))


def _config(base_url: str, state: Path, token_file: Path) -> str:
    audiences = "\n".join(
        f"""
[[destinations.audiences]]
id = "{audience_id}"
name = "{name}"
origin = "segmentation"
[destinations.audiences.flush]
max_records = 250
max_age_seconds = 0.5
"""
        for audience_id, name, _ in _AUDIENCES
    )
    return f"""
[daemon]
state_dir = "{state}"
drain_seconds = 5
summary_interval_seconds = 5

[ingest]
port = 0

[logging]
level = "warning"

[[destinations]]
name = "demo"
description = "the bundled emulator"
base_url = "{base_url}"
[destinations.credentials]
token = {{ file = "{token_file}" }}
{audiences}
"""


async def _demo(per_audience: int, seed: int, timeout_seconds: float) -> int:
    rng = random.Random(seed)
    settings = EmulatorSettings(
        accounts=max(10_000, per_audience * 4), seed=seed, job_delay_seconds=0.3
    )
    emulator = Emulator(settings)
    with tempfile.TemporaryDirectory(prefix="dbsync-demo-") as tmp:
        root = Path(tmp)
        token_file = root / "token"
        token_file.write_text(settings.token + "\n")
        async with emulator.serve(host="127.0.0.1", port=0) as base_url:
            config_path = root / "config.toml"
            config_path.write_text(_config(base_url, root / "state", token_file))
            daemon = Daemon(config_path)
            running = asyncio.create_task(daemon.run(), name="daemon")
            ready = asyncio.create_task(daemon.ready.wait())
            await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
            if running.done():
                ready.cancel()
                print("dbsync demo: the daemon did not start", file=sys.stderr)
                return int(running.result() or 1)
            assert daemon.ingest_address is not None
            host, port = daemon.ingest_address
            ingest = f"http://{host}:{port}"
            print(f"emulator  {base_url}\ningest    {ingest}")
            try:
                async with aiohttp.ClientSession() as http:
                    tenant = await _tenant_accounts(http, base_url, per_audience * 3)
                    desired = await _feed(http, ingest, tenant, per_audience, rng)
                    converged = await _wait_converged(daemon, timeout_seconds)
                    lists = await _get_json(http, f"{base_url}/_emulator/lists")
            finally:
                daemon.request_shutdown()
                await running
            known = {a.external_id for a in tenant}
            return _report(desired, lists, known, converged)


async def _get_json(http: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with http.get(url) as response:
        response.raise_for_status()
        document: dict[str, object] = await response.json()
        return document


async def _tenant_accounts(http: aiohttp.ClientSession, base_url: str, count: int) -> list[Account]:
    page = await _get_json(http, f"{base_url}/_emulator/accounts?limit={count}&offset=0")
    return msgspec.convert(page["accounts"], list[Account])


async def _feed(
    http: aiohttp.ClientSession,
    ingest: str,
    tenant: list[Account],
    per_audience: int,
    rng: random.Random,
) -> dict[str, set[str]]:
    """Send adds then removes, three ways; return the desired members per audience."""
    (emea, _, _), (aep, _, _), (snapshot, _, _) = _AUDIENCES
    pools = [tenant[i * per_audience : (i + 1) * per_audience] for i in range(3)]
    # Accounts that exist only in the CDP: Demandbase will ignore them.
    strangers = [
        Account(external_id=f"CDP-ONLY-{i}", name=f"Unknown Co {i}", domain=f"unknown{i}.example")
        for i in range(5)
    ]
    now = time.time()

    emea_members = [*pools[0], *strangers]
    await _post_ndjson(http, ingest, [(emea, a, True) for a in emea_members], now)
    await _post_aep(http, ingest, aep, [(a, "realized") for a in pools[1]], now)
    await _put_snapshot(http, ingest, snapshot, pools[2])

    leaving = rng.sample(pools[0], per_audience // 5)
    await _post_ndjson(http, ingest, [(emea, a, False) for a in leaving], now + 1)
    exiting = rng.sample(pools[1], per_audience // 5)
    await _post_aep(http, ingest, aep, [(a, "exited") for a in exiting], now + 1)
    kept = rng.sample(pools[2], per_audience - per_audience // 4)
    newcomers = tenant[3 * per_audience : 3 * per_audience + per_audience // 10]
    await _put_snapshot(http, ingest, snapshot, [*kept, *newcomers])

    return {
        emea: {a.external_id for a in emea_members} - {a.external_id for a in leaving},
        aep: {a.external_id for a in pools[1]} - {a.external_id for a in exiting},
        snapshot: {a.external_id for a in [*kept, *newcomers]},
    }


async def _send(
    http: aiohttp.ClientSession, method: str, url: str, body: bytes, content_type: str
) -> None:
    async with http.request(
        method, url, data=body, headers={"Content-Type": content_type}
    ) as response:
        if response.status != 202:
            raise RuntimeError(
                f"{method} {url} answered {response.status}: {await response.text()}"
            )


async def _post_ndjson(
    http: aiohttp.ClientSession,
    ingest: str,
    changes: Sequence[tuple[str, Account, bool]],
    ts: float,
) -> None:
    lines = [
        msgspec.json.encode(
            {
                "audience_id": audience_id,
                "account": msgspec.to_builtins(account),
                "member": member,
                "ts": ts,
            }
        )
        for audience_id, account, member in changes
    ]
    await _send(http, "POST", f"{ingest}/v1/changes", b"\n".join(lines), "application/x-ndjson")


async def _post_aep(
    http: aiohttp.ClientSession,
    ingest: str,
    audience_id: str,
    statuses: Sequence[tuple[Account, str]],
    ts: float,
) -> None:
    qualified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    profiles = [
        {
            "segmentMembership": {
                "ups": {
                    audience_id: {"status": status, "lastQualificationTime": qualified},
                    # Adobe also sends audiences not activated here: ignored and counted.
                    "not-activated-here": {"status": "realized"},
                }
            },
            "accountName": account.name,
            "accountOrganization": {"domain": account.domain},
            "accountKey": {"sourceKey": account.external_id},
        }
        for account, status in statuses
    ]
    await _send(http, "POST", f"{ingest}/v1/aep", msgspec.json.encode(profiles), "application/json")


async def _put_snapshot(
    http: aiohttp.ClientSession, ingest: str, audience_id: str, accounts: Sequence[Account]
) -> None:
    await _send(
        http,
        "PUT",
        f"{ingest}/v1/audiences/{audience_id}/members",
        encode_accounts(accounts),
        "text/csv",
    )


async def _wait_converged(daemon: Daemon, timeout_seconds: float) -> bool:
    """Until no audience has anything pending or in flight (polls the store)."""
    assert daemon.store is not None
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        if await daemon.store.pending_journal_rows():
            continue
        backlogs = [await daemon.store.backlog(a) for a, _, _ in _AUDIENCES]
        if all(b.pending == 0 and b.in_flight == 0 for b in backlogs):
            return True
    return False


def _report(
    desired: dict[str, set[str]],
    lists: dict[str, object],
    known: set[str],
    converged: bool,
) -> int:
    ok = converged
    print()
    print(f"{'audience':<16}{'fed by':<24}{'desired':>8}{'in list':>9}{'unmatched':>11}  verdict")
    for audience_id, name, fed_by in _AUDIENCES:
        want = desired[audience_id]
        entry = lists.get(name)
        members = set(entry["members"]) if isinstance(entry, dict) else set()
        unmatched = want - known
        equal = members == want & known
        ok = ok and equal
        verdict = "equal" if equal else f"DIFFERS ({len(members ^ (want & known))} accounts)"
        print(
            f"{audience_id:<16}{fed_by:<24}{len(want):>8}{len(members):>9}{len(unmatched):>11}"
            f"  {verdict}"
        )
    print()
    if not converged:
        print("the daemon did not finish delivering before the timeout")
    print(
        "unmatched: accounts the CDP knows but Demandbase's account database does not;"
        " Demandbase ignores them"
    )
    return 0 if ok else 1
