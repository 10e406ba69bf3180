"""The CDP's side of ingest: the three ways a CDP sends changes, and accounts nobody knows.

A CDP sends native NDJSON changes (``POST /v1/changes``), Adobe Experience Platform
profile exports (``POST /v1/aep``) and full snapshots (``PUT
/v1/audiences/{id}/members``). The body encoders are plain functions, so that a
harness that sends its own way (the kill -9 scenarios stream bodies in chunks) builds
the same bytes; :class:`Cdp` sends them and insists on 202.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp
import msgspec

from dbsync.demandbase.csvfile import encode_accounts
from dbsync.model import Account

__all__ = ["Cdp", "aep_profile", "changes_ndjson", "strangers"]

# What AEP stamps on a qualification when a profile does not say.
_QUALIFIED_AT = "2025-03-01T10:00:00Z"


def changes_ndjson(
    changes: Iterable[tuple[str, Account, bool]], *, ts: float | None = None
) -> bytes:
    """The NDJSON body of ``POST /v1/changes``: (audience id, account, member) one a line.

    ``ts``, when given, is every change's timestamp (seconds since the epoch).
    """
    stamp = {} if ts is None else {"ts": ts}
    lines = [
        msgspec.json.encode(
            {"audience_id": audience, "account": account, "member": member, **stamp}
        )
        for audience, account, member in changes
    ]
    return b"\n".join(lines) + b"\n"


def aep_profile(
    account: Account, statuses: Mapping[str, str], *, qualified_at: float | None = None
) -> dict[str, Any]:
    """One AEP HTTP-destination profile export: ``statuses`` maps audience id to status.

    The account sits at the attributes of Adobe's Demandbase destination (the ingest
    defaults): ``accountName``, ``accountOrganization.domain``, ``accountKey.sourceKey``.
    ``qualified_at`` (seconds since the epoch) is each status's ``lastQualificationTime``.
    """
    qualified = (
        _QUALIFIED_AT
        if qualified_at is None
        else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(qualified_at))
    )
    return {
        "segmentMembership": {
            "ups": {
                audience: {"status": status, "lastQualificationTime": qualified}
                for audience, status in statuses.items()
            }
        },
        "identityMap": {"b2b_account": [{"id": account.external_id, "primary": True}]},
        "accountName": account.name,
        "accountOrganization": {"domain": account.domain},
        "accountKey": {"sourceKey": account.external_id},
    }


def strangers(count: int) -> list[Account]:
    """Accounts the CDP knows and the tenant does not: Demandbase ignores their rows."""
    return [
        Account(external_id=f"CDP-ONLY-{i}", name=f"Nobody Known {i}", domain=f"nobody{i}.invalid")
        for i in range(count)
    ]


class Cdp:
    """Sends to one daemon's ingest. The typed senders insist on 202 and return its counts."""

    def __init__(self, http: aiohttp.ClientSession, ingest_url: str) -> None:
        self.http = http
        self.url = ingest_url

    async def send(
        self, method: str, path: str, body: bytes, content_type: str
    ) -> tuple[int, dict[str, Any]]:
        """Any request, answered or refused: its status and JSON body."""
        async with self.http.request(
            method, f"{self.url}{path}", data=body, headers={"Content-Type": content_type}
        ) as response:
            return response.status, await response.json()

    async def changes(
        self, changes: Iterable[tuple[str, Account, bool]], *, ts: float | None = None
    ) -> dict[str, Any]:
        """``POST /v1/changes``, NDJSON (see :func:`changes_ndjson`)."""
        body = changes_ndjson(changes, ts=ts)
        return await self._accepted("POST", "/v1/changes", body, "application/x-ndjson")

    async def aep(self, profiles: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``POST /v1/aep``: an array of AEP profile exports (see :func:`aep_profile`)."""
        return await self._accepted(
            "POST", "/v1/aep", msgspec.json.encode(profiles), "application/json"
        )

    async def snapshot(
        self, audience_id: str, accounts: Sequence[Account], *, media: str = "csv"
    ) -> dict[str, Any]:
        """``PUT /v1/audiences/{id}/members``: the whole membership, as CSV or NDJSON."""
        if media == "csv":
            body, content_type = encode_accounts(accounts), "text/csv"
        else:
            body = b"".join(msgspec.json.encode(a) + b"\n" for a in accounts)
            content_type = "application/x-ndjson"
        return await self._accepted(
            "PUT", f"/v1/audiences/{audience_id}/members", body, content_type
        )

    async def health(self) -> int:
        async with self.http.get(f"{self.url}/v1/health") as response:
            return response.status

    async def _accepted(
        self, method: str, path: str, body: bytes, content_type: str
    ) -> dict[str, Any]:
        status, answer = await self.send(method, path, body, content_type)
        if status != 202:
            # Raised, not asserted: the demo relies on it under ``python -O`` too.
            raise AssertionError(f"{method} {path}: {status} {answer}")
        return answer
