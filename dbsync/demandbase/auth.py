"""Where the client's bearer tokens come from: a legacy user token, or an API Key Set.

A :class:`TokenSource` gives the token to send (:meth:`~TokenSource.token`) and is told
when Demandbase answered 401 to it (:meth:`~TokenSource.invalidate`), answering whether
a fresh token can be had; the client repeats the request once if so.

:class:`LegacyToken` is the user token that Adobe's destination asks for: static, with
no documented expiry and no way to mint another, so its 401 stops the destination.

:class:`ApiKeyTokenSource` exchanges an API Key Set's client id and secret for a token
at ``POST /auth/v1/token`` and follows Demandbase's advice to the letter [DOC]: cache
the token, mint again only after a 401 or within :data:`REFRESH_MARGIN_SECONDS` of its
expiry, and never mint many at once, which may trip abuse protection. Concurrent callers
therefore share one mint behind a lock, and a 401 invalidates the cached token only if
it is the token that was refused, so that many calls refused together cause one mint.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import aiohttp
import msgspec

from dbsync.clock import Clock
from dbsync.config import Credentials
from dbsync.demandbase import wire
from dbsync.demandbase.http import RequestObserver, decode_answer, send
from dbsync.demandbase.wire import Endpoint

__all__ = ["REFRESH_MARGIN_SECONDS", "ApiKeyTokenSource", "LegacyToken", "TokenSource"]

_log = logging.getLogger(__name__)

# Mint a new token once the cached one has less than this left to live [DOC: 15 minutes].
REFRESH_MARGIN_SECONDS = 900

_encoder = msgspec.json.Encoder()
_token_response = msgspec.json.Decoder(wire.TokenResponse)


class TokenSource(Protocol):
    """Bearer tokens for the client."""

    @property
    def mode(self) -> str:
        """The authentication mode's name, for logs and status (never the token)."""
        ...

    async def token(self) -> str:
        """The token to send now."""
        ...

    async def invalidate(self, token: str) -> bool:
        """Demandbase refused ``token`` with a 401; whether a fresh token can be had."""
        ...


class LegacyToken:
    """A user's API token from "My Profile > API Token": static, never re-minted."""

    mode = "legacy_token"

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the legacy token is empty")
        self._token = token

    def __repr__(self) -> str:
        return "LegacyToken(<redacted>)"

    async def token(self) -> str:
        return self._token

    async def invalidate(self, token: str) -> bool:
        return False


class _MintedToken(msgspec.Struct, frozen=True):
    value: str
    refresh_at: float  # on the clock's monotonic scale


class ApiKeyTokenSource:
    """Tokens minted from an API Key Set's client credentials, cached and shared."""

    mode = "api_key_set"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        clock: Clock,
        timeout_seconds: float = 30.0,
        observer: RequestObserver | None = None,
    ) -> None:
        if not client_id or not client_secret:
            raise ValueError("the API Key Set needs both a client id and a client secret")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, not {timeout_seconds}")
        self._session = session
        self._url = f"{base_url.rstrip('/')}/auth/v1/token"
        self._request_body = _encoder.encode(
            wire.TokenRequest(client_id=client_id, client_secret=client_secret)
        )
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._observer = observer
        self._minted: _MintedToken | None = None
        self._minting = asyncio.Lock()

    def __repr__(self) -> str:
        return "ApiKeyTokenSource(<redacted>)"

    async def token(self) -> str:
        if (minted := self._fresh()) is not None:
            return minted.value
        async with self._minting:
            # Whoever held the lock before us may have minted the token we came for.
            if (minted := self._fresh()) is None:
                minted = self._minted = await self._mint()
            return minted.value

    async def invalidate(self, token: str) -> bool:
        # Only the refused token is dropped: when many calls are refused at once, the
        # first to come here drops it and the others find a newer one (or a mint under
        # way) rather than each causing a mint of its own.
        if self._minted is not None and self._minted.value == token:
            self._minted = None
        return True

    def _fresh(self) -> _MintedToken | None:
        minted = self._minted
        if minted is None or self._clock.monotonic() >= minted.refresh_at:
            return None
        return minted

    async def _mint(self) -> _MintedToken:
        body = await send(
            self._session,
            Endpoint.AUTH_TOKEN,
            "POST",
            self._url,
            client_timeout=self._timeout,
            observer=self._observer,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            data=self._request_body,
        )
        answer = decode_answer(_token_response, body, Endpoint.AUTH_TOKEN)
        # A token that lives less than twice the margin is refreshed halfway through its
        # life instead, so that a short-lived token is not minted again on every call.
        margin_seconds = min(REFRESH_MARGIN_SECONDS, answer.expires_in / 2)
        _log.info(
            "demandbase_token_minted",
            extra={"auth_mode": self.mode, "expires_in_seconds": answer.expires_in},
        )
        return _MintedToken(
            answer.access_token, self._clock.monotonic() + answer.expires_in - margin_seconds
        )


def token_source(
    session: aiohttp.ClientSession,
    base_url: str,
    credentials: Credentials,
    *,
    clock: Clock,
    timeout_seconds: float,
) -> TokenSource:
    """The token source ``credentials`` call for: the legacy token, or an API key set's
    minted tokens."""
    if credentials.token is not None:
        return LegacyToken(credentials.token)
    assert credentials.client_id is not None
    assert credentials.client_secret is not None
    return ApiKeyTokenSource(
        session,
        base_url,
        credentials.client_id,
        credentials.client_secret,
        clock=clock,
        timeout_seconds=timeout_seconds,
    )
