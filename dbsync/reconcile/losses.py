"""Loss rates: how many accounts a destination loses per thousand sent, throttled or not.

Each completed batch is marked *throttled* when a 429 was met by its destination while it
was open; the read-backs' verdicts are counted on the batch whose acknowledgment they judge.
An account counts as lost once per loss: a repair that a later read-back still misses is the
same loss (an account Demandbase cannot match would otherwise count at every read-back until
it is set aside, and the rate would grow with the read-backs), so it is neither judged nor
lost again on its batch. Comparing the two rates says whether throttling causes the losses
(what Adobe's documentation calls data that "never reaches Demandbase").
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from dbsync.model import LossTally

__all__ = ["LossEstimate", "LossRate", "estimate_losses"]


class LossRate(msgspec.Struct, frozen=True, kw_only=True):
    """Acknowledged rows of some completed batches and the read-backs' verdicts on them."""

    batches: int
    acknowledged: int
    judged: int  # verified or lost; the others were overtaken or await a read-back
    lost: int
    lost_per_thousand: float | None  # lost per thousand judged; None when none was


class LossEstimate(msgspec.Struct, frozen=True, kw_only=True):
    """How many accounts a destination loses per thousand sent, throttled or not.

    A batch counts as *throttled* when a 429 was met by the destination while it was
    open (from planning to acknowledgment). If ``throttled`` loses far more per
    thousand than ``unthrottled``, throttling causes the losses.
    """

    destination: str
    since: float
    overall: LossRate
    throttled: LossRate
    unthrottled: LossRate


def estimate_losses(destination: str, since: float, tallies: Sequence[LossTally]) -> LossEstimate:
    """The loss rates over ``tallies`` (:meth:`~dbsync.store.Store.loss_tallies`)."""

    def rate(parts: Sequence[LossTally]) -> LossRate:
        judged = sum(t.verified + t.lost for t in parts)
        lost = sum(t.lost for t in parts)
        return LossRate(
            batches=sum(t.batches for t in parts),
            acknowledged=sum(t.acknowledged for t in parts),
            judged=judged,
            lost=lost,
            lost_per_thousand=round(1000 * lost / judged, 3) if judged else None,
        )

    return LossEstimate(
        destination=destination,
        since=since,
        overall=rate(tallies),
        throttled=rate([t for t in tallies if t.throttled]),
        unthrottled=rate([t for t in tallies if not t.throttled]),
    )
