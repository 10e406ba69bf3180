"""One actor per activated audience: it turns the audience's dirty set into import jobs.

The queue is the difference, not a log: the store keeps, per account, the desired
state and the state Demandbase acknowledged, and the actor sends only accounts whose
two states differ (ARCHITECTURE invariant 3). Many changes to one account therefore
cost one row.

An actor's life::

    resume open batches ──> idle ──backlog due and budget grants──> delivering ──┐
                             ^  └──pause──> paused ──resume──┘                   │
                             └───────────────────────────────────────────────────┘

The actor is three modules, one noun each:

* :mod:`~dbsync.actor.audience`: the actor itself: mailbox, flush policy, batches,
  the import job's life (create, upload, poll, checkpoint);
* :mod:`~dbsync.actor.calls`: what the actor does around each call to Demandbase
  (the retry policy's hooks: destination, pace, budget, 429s, failures) and the
  audience state that they and the loop report;
* :mod:`~dbsync.actor.settings`: what an actor is built from (its settings, the
  part of the store it uses).
"""

from dbsync.actor.audience import ADOPTION_RECHECK_SECONDS, REFUSED_HOLD_SECONDS, AudienceActor
from dbsync.actor.settings import ActorSettings, DeliveryStore
from dbsync.destination import Destination, ImportClient

# Destination and ImportClient used to live here; importers of them keep working.
__all__ = [
    "ADOPTION_RECHECK_SECONDS",
    "REFUSED_HOLD_SECONDS",
    "ActorSettings",
    "AudienceActor",
    "DeliveryStore",
    "Destination",
    "ImportClient",
]
