"""Latency: with the budget free, seconds from a change's commit to its job's upload.

The emulator (in this process, recording its exchanges) and a real daemon, every
limit far out of reach. The CDP posts one change per request at a steady
``--rate`` for ``--seconds``, over four audiences, and notes when each 202 came back
(the 202 is sent once the change is committed). Each upload Demandbase received
(``PUT /import/v1/job/{id}/data``) names its accounts in its CSV; a change's latency
is from its 202 to the end of the upload that carried it. The flush policy's
``max_age_seconds`` (``--max-age-seconds``; the configuration's default is 60) is
the floor under it: a batch waits that long for company unless it fills up.

    python bench/latency.py [--rate 50] [--seconds 10] [--max-age-seconds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench._common import add_check_flag, emit, say

AUDIENCES = 4


async def run(directory: Path, rate: float, seconds: float, max_age: float) -> dict[str, Any]:
    from dbsync.demandbase.csvfile import read_rows
    from dbsync.demandbase.emulator.routes import Endpoint
    from dbsync.testing import AudienceConfig, fast_tenant, running_engine

    count = int(rate * seconds)
    audiences = [
        AudienceConfig(f"latency-{i}", max_age_seconds=max_age, max_records=10_000)
        for i in range(AUDIENCES)
    ]
    tenant = fast_tenant(accounts=max(count, 10), record_exchanges=True, max_exchanges=100_000)
    async with running_engine(directory, audiences, tenant=tenant) as engine:
        accounts = await engine.tenant_accounts(count)
        committed: dict[str, float] = {}
        started = time.perf_counter()
        for i, account in enumerate(accounts):
            # A steady pace: the i-th change leaves at i / rate.
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await engine.cdp.changes([(audiences[i % AUDIENCES].id, account, True)])
            committed[account.external_id] = time.time()
        await engine.wait_settled(timeout=60 + 2 * max_age)
        uploaded: dict[str, float] = {}
        for exchange in engine.emulator.emulator.exchanges:
            if exchange.endpoint is Endpoint.IMPORT_UPLOAD and exchange.status < 300:
                for row in read_rows(exchange.request_body):
                    uploaded.setdefault(row["External Account ID"], exchange.at)
    missing = set(committed) - set(uploaded)
    assert not missing, f"{len(missing)} changes never uploaded"
    latencies = sorted(uploaded[key] - at for key, at in committed.items())
    return {"latencies": latencies, "uploads": len(uploaded)}


def percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="changes a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-age-seconds", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="2 s at 50 changes/s")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.seconds = 2.0

    with tempfile.TemporaryDirectory(prefix="dbsync-bench-") as tmp:
        result = uvloop.run(run(Path(tmp), args.rate, args.seconds, args.max_age_seconds))

    latencies = result["latencies"]
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    say(
        f"{len(latencies)} changes, max_age {args.max_age_seconds} s: commit to upload"
        f" p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    return emit(
        "latency",
        {
            "changes": len(latencies),
            "rate_per_second": args.rate,
            "max_age_seconds": args.max_age_seconds,
            "p50_ms": round(p50 * 1000, 1),
            "p99_ms": round(p99 * 1000, 1),
            "max_ms": round(latencies[-1] * 1000, 1),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 1),
        },
        check=args.check,
    )


if __name__ == "__main__":
    raise SystemExit(main())
