"""The Structs that cross boundaries between parts: accounts and membership changes.

Everything here is a frozen msgspec Struct with no behaviour beyond validation, so
that ingest, store, actors and reconciler speak one shape.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["Account", "AccountKey", "Change"]

AccountKey = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Account(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A company as the CDP knows it; ``external_id`` is the CDP's key."""

    external_id: AccountKey
    name: str = ""
    domain: str = ""


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """``account`` should (``member``) or should not be in ``audience_id``'s list.

    ``ts`` is when the CDP decided it (epoch seconds), or when dbsync received it.
    """

    audience_id: str
    account: Account
    member: bool
    ts: float
