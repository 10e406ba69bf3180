"""Read-back: what each Demandbase list really holds, compared with desired state, repaired.

A package by noun: :mod:`~dbsync.reconcile.reconciler` runs the loop within the
destination's quotas, :mod:`~dbsync.reconcile.schedule` decides whose turn it is,
:mod:`~dbsync.reconcile.readback` runs one export job from its creation to a report
per list, :mod:`~dbsync.reconcile.multi` plans many lists per job and counts the
export volume, :mod:`~dbsync.reconcile.adoption` adopts existing lists,
:mod:`~dbsync.reconcile.losses` the loss rates and :mod:`~dbsync.reconcile.report`
the report and its events. What callers import is
re-exported here. The judgment itself, a pure rule the store applies inside each
chunk's transaction, is :mod:`dbsync.judgment`, a layer below the store.
"""

from __future__ import annotations

from dbsync.reconcile.losses import LossEstimate, LossRate, estimate_losses
from dbsync.reconcile.reconciler import (
    ExportClient,
    ReadbackStore,
    ReconcileDeferred,
    ReconcilePlan,
    Reconciler,
)
from dbsync.reconcile.report import ReconcileReport, log_ledger_imbalance
from dbsync.reconcile.schedule import days_to_reconcile_all, due_at, predict_next, turn_order

__all__ = [
    "ExportClient",
    "LossEstimate",
    "LossRate",
    "ReadbackStore",
    "ReconcileDeferred",
    "ReconcilePlan",
    "ReconcileReport",
    "Reconciler",
    "days_to_reconcile_all",
    "due_at",
    "estimate_losses",
    "log_ledger_imbalance",
    "predict_next",
    "turn_order",
]
