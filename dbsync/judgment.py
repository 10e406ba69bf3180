"""The read-back judgment: which of an audience's accounts a list proves right or wrong.

Pure: no SQLite, no I/O, no clock. The store reads an audience's accounts in chunks
and, inside the transaction of each chunk, asks :func:`judge_chunk` what to do with
them; it then applies the :class:`ChunkDecision` (marks to send again, sets aside,
counts) in the same transaction, so that nothing moves between the comparison and
the repair. Keeping the rule here lets it be read, and tested, without a database.

It sits a layer below the store (it imports only :mod:`dbsync.model`), not in
:mod:`dbsync.reconcile`: the store must call it mid-transaction, and the store may
not import anything above it. The reconciler never calls it; it hands the list to
:meth:`~dbsync.store.Store.apply_readback`.

The rule, for one account as the store holds it:

* not *settled* (desired <> delivered, in flight, or set aside): not judged
  (``unsettled``), whatever the list says;
* acknowledged (else changed) after ``judged_before``: not judged (``too_young``):
  Demandbase applies loaded data late, so a recent change missing is not a loss;
* a member: in the list is *verified*; missing is *lost*, ``dropped`` if an
  acknowledgment put it there, ``vanished`` if it was seen there before;
* not a member: missing from the list is verified (if an acknowledgment awaits a
  verdict) or nothing to say; listed with an acknowledged removal is lost
  (``not_removed``); listed without one is *extra*: dbsync never put it there;
* a lost account is sent again (repaired) until it was repaired ``repair_limit``
  times; then it is set aside (``unmatched`` or ``not_removable``) with a reason.

Which of our accounts the list holds is :func:`match_listed`: by external id, then
by domain and name as Demandbase matches import rows.

Most accounts of a list are *plain*: settled, acknowledged (else changed) by the
cutoff, a member in the list or a non-member missing from it. The rule verifies them
and has nothing else to say: their awaited acknowledgment (and a member's repairs) is
cleared. The store counts and clears those in SQL, without reading them out
(:meth:`ChunkDecision.add_plain`), and asks :func:`judge_chunk` about the rest; a
test checks that the two ways agree, account by account.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from dbsync.model import Account, ListedAccount, LossCause, ReadbackVerdict, RejectReason

__all__ = [
    "ChunkDecision",
    "Judgment",
    "Listing",
    "MemberRow",
    "OurAccount",
    "judge_chunk",
    "match_key",
    "match_listed",
    "set_aside_reason",
]

# One of our accounts as matching needs it: (external id, name, domain).
OurAccount = tuple[str, str, str]

# One of our accounts as judging needs it: (external id, name, domain, desired,
# delivered, in_flight, rejected, acked_at, ack_batch, changed_at, repairs).
MemberRow = tuple[str, str, str, int, int, int | None, int, float | None, int | None, float, int]


def match_key(domain: str, name: str) -> tuple[str, str]:
    """How Demandbase compares an account's domain and name: trimmed, case-insensitively."""
    return domain.strip().casefold(), name.strip().casefold()


def match_listed(
    ours: Sequence[OurAccount], listed: Sequence[ListedAccount]
) -> tuple[set[str], dict[str, ListedAccount], int]:
    """Which of our accounts (external id, name, domain) the list holds; the listed
    strangers that can be removed (they have an external id and match none of ours);
    and how many strangers cannot be (no external id for a delete row to name)."""
    known = {row[0] for row in ours}
    present: set[str] = set()
    strangers: dict[str, ListedAccount] = {}
    nameless = 0
    by_key: dict[tuple[str, str], str] | None = None
    for account in listed:
        if account.external_id in known:
            present.add(account.external_id)
            continue
        if by_key is None:
            by_key = {match_key(domain, name): key for key, name, domain in ours}
        key = by_key.get(match_key(account.domain, account.name))
        if key is not None:
            present.add(key)
        elif account.external_id:
            strangers.setdefault(account.external_id, account)
        else:
            nameless += 1  # added in Demandbase, most likely: left for a person to judge
    return present, strangers, nameless


def set_aside_reason(reason: RejectReason, repairs: int) -> str:
    """The operator's text for an account set aside after ``repairs`` repairs."""
    if reason is RejectReason.UNMATCHED:
        text = (
            f"still missing from the list after {repairs} repairs: Demandbase has no"
            " account matching its external id, domain or name"
        )
    else:
        text = f"still in the list after {repairs} removals were acknowledged"
    return f"{reason}: {text}"


class Listing(msgspec.Struct, frozen=True, kw_only=True):
    """What one read-back judges its audience against (see :func:`match_listed`)."""

    listed: int
    strangers: dict[str, ListedAccount]
    nameless: int
    judged_before: float
    repair_limit: int
    now: float


class ChunkDecision(msgspec.Struct, kw_only=True):
    """What :func:`judge_chunk` found in a chunk of accounts, and what must happen to them.

    Keys are external ids. ``cleared``: a verdict was given (verified) or the account
    was seen right again, so its awaited acknowledgment and its repairs are cleared.
    ``batch_verified`` and ``batch_lost`` count verdicts by the batch whose acknowledgment
    they judge; an account already lost once (repairs) and still missing is not counted on
    its batch again, so the loss estimate counts each loss once. ``unmatched`` and
    ``not_removable`` pair each account set aside with the repairs it had.
    """

    expected: int = 0
    verified: int = 0
    too_young: int = 0
    unsettled: int = 0
    cleared: list[str] = msgspec.field(default_factory=list)
    verified_acks: int = 0
    lost: dict[str, int] = msgspec.field(default_factory=dict)
    batch_verified: dict[int, int] = msgspec.field(default_factory=dict)
    batch_lost: dict[int, int] = msgspec.field(default_factory=dict)
    resend_inserts: list[str] = msgspec.field(default_factory=list)
    resend_deletes: list[str] = msgspec.field(default_factory=list)
    extras: list[str] = msgspec.field(default_factory=list)
    unmatched: list[tuple[Account, int]] = msgspec.field(default_factory=list)
    not_removable: list[tuple[Account, int]] = msgspec.field(default_factory=list)

    def add_plain(self, *, desired: bool, ack_batch: int | None, accounts: int) -> None:
        """Count ``accounts`` plain accounts (see the module) of one ``desired`` and one
        ``ack_batch``, as :func:`judge_chunk` would: members verified, each awaited
        acknowledgment verified on its batch. The store clears their acknowledgments
        (and members' repairs) itself, so they are not listed in ``cleared``."""
        if desired:
            self.expected += accounts
            self.verified += accounts
        if ack_batch is not None:
            self.verified_acks += accounts
            self.batch_verified[ack_batch] = self.batch_verified.get(ack_batch, 0) + accounts

    @property
    def repaired(self) -> int:
        return len(self.resend_inserts) + len(self.resend_deletes)


def judge_chunk(
    rows: Iterable[MemberRow], present: set[str], *, judged_before: float, repair_limit: int
) -> ChunkDecision:
    """Judge ``rows`` (our accounts, as the store holds them) against the list's ``present``."""
    decision = ChunkDecision()
    lost = decision.lost
    batch_verified = decision.batch_verified
    batch_lost = decision.batch_lost
    for row in rows:
        key, name, domain, desired, delivered, in_flight, rejected, acked_at, ack = row[:9]
        changed_at, repairs = row[9:]
        in_list = key in present
        relevant = bool(desired or in_list or ack is not None)
        if desired != delivered or in_flight is not None or rejected:
            decision.unsettled += relevant
            continue
        if (acked_at if acked_at is not None else changed_at) > judged_before:
            decision.too_young += relevant  # recent changes may not be visible yet: never lost
            continue
        if desired:
            decision.expected += 1
            if in_list:
                decision.verified += 1
                if ack is not None or repairs:
                    decision.cleared.append(key)
                if ack is not None:
                    decision.verified_acks += 1
                    batch_verified[ack] = batch_verified.get(ack, 0) + 1
                continue
            cause = LossCause.DROPPED if ack is not None else LossCause.VANISHED
        else:
            if not in_list:
                if ack is not None:
                    decision.cleared.append(key)
                    decision.verified_acks += 1
                    batch_verified[ack] = batch_verified.get(ack, 0) + 1
                continue
            if ack is None:
                decision.extras.append(key)
                continue
            cause = LossCause.NOT_REMOVED
        lost[cause] = lost.get(cause, 0) + 1
        if ack is not None and not repairs:
            # One loss, one count in the estimate: a repair still missing is the same
            # loss (an account Demandbase cannot match would count at every read-back).
            batch_lost[ack] = batch_lost.get(ack, 0) + 1
        if repairs >= repair_limit:
            ours = Account(external_id=key, name=name, domain=domain)
            (decision.unmatched if desired else decision.not_removable).append((ours, repairs))
        else:
            (decision.resend_inserts if desired else decision.resend_deletes).append(key)
    return decision


class Judgment(msgspec.Struct, kw_only=True):
    """A read-back's verdict so far, kept with its run between two chunks."""

    expected: int = 0
    verified: int = 0
    lost: dict[str, int] = msgspec.field(default_factory=dict)
    repaired: int = 0
    extra_removed: int = 0
    unmatched: list[Account] = msgspec.field(default_factory=list)
    not_removable: list[Account] = msgspec.field(default_factory=list)
    too_young: int = 0
    unsettled: int = 0

    def add(self, decision: ChunkDecision, *, strangers_removed: int = 0) -> None:
        """Count one chunk's decision (and, on the last, the strangers marked for removal)."""
        self.expected += decision.expected
        self.verified += decision.verified
        self.too_young += decision.too_young
        self.unsettled += decision.unsettled
        for cause, n in decision.lost.items():
            self.lost[cause] = self.lost.get(cause, 0) + n
        self.repaired += decision.repaired
        self.extra_removed += len(decision.extras) + strangers_removed
        self.unmatched += (a for a, _ in decision.unmatched)
        self.not_removable += (a for a, _ in decision.not_removable)

    def verdict(self, listing: Listing) -> ReadbackVerdict:
        return ReadbackVerdict(
            listed=listing.listed,
            expected=self.expected,
            verified=self.verified,
            lost=self.lost,
            repaired=self.repaired,
            extra_removed=self.extra_removed,
            extra_kept=listing.nameless,
            unmatched=tuple(self.unmatched),
            not_removable=tuple(self.not_removable),
            too_young=self.too_young,
            unsettled=self.unsettled,
        )
