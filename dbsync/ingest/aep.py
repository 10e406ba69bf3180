"""Adobe Experience Platform profile exports mapped to membership changes.

What Adobe sends (Experience League: "HTTP API connection", section *Exported data*;
Destination SDK "Message format"; both cited with examples in ``tests/data/aep``):

- a body is one profile, a JSON array of profiles, or a batch wrapper object whose
  ``profiles`` array holds them (other keys of the wrapper, such as an aggregation
  key's ``audienceId``, are ignored);
- a profile's ``segmentMembership`` maps an audience namespace (``ups`` for
  Segmentation Service audiences, others such as ``CustomerAudienceUpload``) to audience
  ids, each with ``status`` and ``lastQualificationTime``. ``realized`` and
  ``existing`` mean member, ``exited`` means not;
- ``identityMap`` maps an identity namespace to ``[{"id": ..., "primary": ...}]``;
- attributes sit at their XDM paths (HTTP API destination: ``accountOrganization``
  → ``{"domain": ...}``) or, in Destination SDK profiles, under ``attributes``, where a
  freeform attribute is wrapped as ``{"value": ...}`` and an absent one is ``{}``.

Adobe's own Demandbase destination requires three mappings, which are the defaults
here: ``accountName`` (name), ``accountOrganization.domain`` (domain) and
``accountKey.sourceKey`` (the identity Demandbase matches on, our external id). The
external id may instead come from an identity namespace (the primary identity, else
the first one), for exports that carry the account key only in ``identityMap``.

A membership of an audience not activated here is not an error: Adobe adds unmapped
audiences that share a merge policy with a mapped one. It is ignored and counted. A
profile with at least one activated audience must carry an account key, or the request
is rejected naming the path; a profile without any is ignored and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Set
from typing import Any, Protocol

import msgspec

from dbsync.ingest.bodies import KEY_MAX_LENGTH, Rejected, check_account, received_ts
from dbsync.model import Account, Change

__all__ = ["AepBatch", "AepMapping", "AepMappingLike", "changes_from_aep", "profiles_in"]

MEMBER_STATUSES = {"realized": True, "existing": True, "exited": False}


class AepMappingLike(Protocol):
    """What a mapping tells; ``dbsync.config.AepMapping`` has these same fields."""

    @property
    def name_attribute(self) -> str: ...
    @property
    def domain_attribute(self) -> str: ...
    @property
    def external_id_attribute(self) -> str: ...
    @property
    def identity_namespace(self) -> str | None: ...


class AepMapping(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where an account's fields are in a profile: dotted attribute paths.

    When ``identity_namespace`` is set, the external id is the id of that namespace's
    primary identity (else its first) in ``identityMap``, and ``external_id_attribute``
    is not read.
    """

    name_attribute: str = "accountName"
    domain_attribute: str = "accountOrganization.domain"
    external_id_attribute: str = "accountKey.sourceKey"
    identity_namespace: str | None = None


class AepBatch(msgspec.Struct, frozen=True, kw_only=True):
    """The changes of one payload, and what was left aside."""

    changes: list[Change]
    profiles: int
    profiles_ignored: int  # carried no activated audience
    audiences_ignored: dict[str, int]  # memberships of audiences not activated here, by id


def profiles_in(document: object) -> list[tuple[str, object]]:
    """The profiles of a payload, each with the path that names it in rejections."""
    if isinstance(document, list):
        return [(f"[{i}]", profile) for i, profile in enumerate(document)]
    if isinstance(document, dict):
        wrapped = document.get("profiles")
        if isinstance(wrapped, list) and "segmentMembership" not in document:
            return [(f"profiles[{i}]", profile) for i, profile in enumerate(wrapped)]
        return [("", document)]
    raise Rejected(400, 'expected a profile, an array of profiles or {"profiles": [...]}', "body")


def changes_from_aep(
    document: object, *, active: Set[str], mapping: AepMappingLike, now: float
) -> AepBatch:
    """Every activated membership in ``document`` as a change, or :class:`Rejected`."""
    changes: list[Change] = []
    ignored: Counter[str] = Counter()
    profiles = profiles_ignored = 0
    for where, profile in profiles_in(document):
        profiles += 1
        if not isinstance(profile, dict):
            raise Rejected(400, "a profile must be a JSON object", where or "body")
        memberships = _memberships(profile, where, active, ignored, now)
        if not memberships:
            profiles_ignored += 1
            continue
        account = _account(profile, where, mapping)
        changes.extend(
            Change(audience_id=audience_id, account=account, member=member, ts=ts)
            for audience_id, member, ts in memberships
        )
    return AepBatch(
        changes=changes,
        profiles=profiles,
        profiles_ignored=profiles_ignored,
        audiences_ignored=dict(ignored),
    )


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _memberships(
    profile: dict[str, Any], where: str, active: Set[str], ignored: Counter[str], now: float
) -> list[tuple[str, bool, float]]:
    found: list[tuple[str, bool, float]] = []
    namespaces = profile.get("segmentMembership")
    if namespaces is None:
        return found
    if not isinstance(namespaces, dict):
        raise Rejected(400, "must be an object", _join(where, "segmentMembership"))
    for namespace, audiences in namespaces.items():
        path = _join(where, f"segmentMembership.{namespace}")
        if not isinstance(audiences, dict):
            raise Rejected(400, "must be an object of audience ids", path)
        for audience_id, membership in audiences.items():
            if audience_id not in active:
                ignored[audience_id] += 1
                continue
            at = f"{path}.{audience_id}"
            if not isinstance(membership, dict):
                raise Rejected(400, "must be an object", at)
            status = membership.get("status")
            member = MEMBER_STATUSES.get(status) if isinstance(status, str) else None
            if member is None:
                raise Rejected(
                    400, f"status {status!r} is not realized, existing or exited", f"{at}.status"
                )
            qualified = membership.get("lastQualificationTime")
            try:
                ts = received_ts(qualified, now)
            except ValueError as exc:
                raise Rejected(400, str(exc), f"{at}.lastQualificationTime") from None
            found.append((audience_id, member, ts))
    return found


def _account(profile: dict[str, Any], where: str, mapping: AepMappingLike) -> Account:
    if mapping.identity_namespace:
        external_id, at = _identity(profile, where, mapping.identity_namespace)
    else:
        external_id, at = _attribute(profile, where, mapping.external_id_attribute)
    if external_id is None:
        raise Rejected(400, "no account key, yet the profile is in an activated audience", at)
    if not isinstance(external_id, str):
        raise Rejected(400, "an account key must be a string", at)
    if not external_id.strip() or len(external_id) > KEY_MAX_LENGTH:
        raise Rejected(400, f"an account key must hold 1 to {KEY_MAX_LENGTH} characters", at)
    account = Account(
        external_id=external_id,
        name=_text(profile, where, mapping.name_attribute),
        domain=_text(profile, where, mapping.domain_attribute),
    )
    if problem := check_account(account):
        field, detail = problem
        attribute = {"name": mapping.name_attribute, "domain": mapping.domain_attribute}
        path = _join(where, attribute[field]) if field in attribute else at
        raise Rejected(400, f"{field} {detail}", path)
    return account


def _identity(profile: dict[str, Any], where: str, namespace: str) -> tuple[object, str]:
    """The id of the namespace's primary identity, else of its first one."""
    identity_map = profile.get("identityMap")
    if identity_map is None:
        return None, _join(where, f"identityMap.{namespace}")
    if not isinstance(identity_map, dict):
        raise Rejected(400, "must be an object of identity namespaces", _join(where, "identityMap"))
    identities = identity_map.get(namespace)
    if identities is None or identities == []:
        return None, _join(where, f"identityMap.{namespace}")
    if not isinstance(identities, list) or not all(isinstance(i, dict) for i in identities):
        raise Rejected(
            400, "must be an array of identities", _join(where, f"identityMap.{namespace}")
        )
    index = next((i for i, identity in enumerate(identities) if identity.get("primary") is True), 0)
    return identities[index].get("id"), _join(where, f"identityMap.{namespace}[{index}].id")


def _text(profile: dict[str, Any], where: str, path: str) -> str:
    value, at = _attribute(profile, where, path)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Rejected(400, "must be a string", at)
    return value


def _attribute(profile: dict[str, Any], where: str, path: str) -> tuple[object, str]:
    """The value at ``path`` from the profile's root, else under ``attributes``."""
    parts = path.split(".")
    for root, prefix in ((profile, ""), (profile.get("attributes"), "attributes.")):
        node: object = root
        for part in parts:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node = node.get("value")  # a freeform attribute: {"value": ...}, or {} when absent
        if node is not None:
            return node, _join(where, prefix + path)
    return None, _join(where, path)
