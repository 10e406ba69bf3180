"""Who may call the emulator: the legacy user token and API Key Set tokens, side by side.

Demandbase accepts two kinds of bearer token [DOC] and so does the emulator, at once:
the settings' legacy ``token`` (no expiry), and tokens minted by ``POST
/auth/v1/token`` from the API Key Set's client id and secret. Minted tokens are
opaque random strings that expire ``token_ttl_seconds`` after minting on the
emulator's clock; an ``expire_tokens`` fault revokes every one minted so far.
"""

from __future__ import annotations

import enum
import hmac
import secrets

from dbsync.clock import Clock

__all__ = ["TokenCheck", "Tokens", "bearer_token"]


class TokenCheck(enum.Enum):
    VALID = "valid"
    MISSING = "missing"
    UNKNOWN = "unknown"
    EXPIRED = "expired"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Tokens:
    """The legacy token and the minted ones, with their expiry times."""

    def __init__(self, legacy_token: str, ttl_seconds: int, clock: Clock) -> None:
        self._legacy = legacy_token
        self._ttl_seconds = ttl_seconds
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self.minted = 0

    def mint(self) -> str:
        token = secrets.token_urlsafe(32)
        self._expiry[token] = self._clock.time() + self._ttl_seconds
        self.minted += 1
        return token

    def check(self, token: str | None) -> TokenCheck:
        if token is None:
            return TokenCheck.MISSING
        if hmac.compare_digest(token.encode(), self._legacy.encode()):
            return TokenCheck.VALID
        expires_at = self._expiry.get(token)
        if expires_at is None:
            return TokenCheck.UNKNOWN
        if self._clock.time() >= expires_at:
            del self._expiry[token]
            return TokenCheck.EXPIRED
        return TokenCheck.VALID

    def expire_all(self) -> int:
        """Revoke every minted token; returns how many were still known."""
        revoked = len(self._expiry)
        self._expiry.clear()
        return revoked
