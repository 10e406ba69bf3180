"""Every state machine of dbsync, with the transitions it allows.

This module imports nothing from dbsync, so that any part (the store, the actor, the
admin client, ``dbsync ctl``) can name a state without pulling in the rest, as
Supervisor's ``states.py`` does. Each machine is a :class:`enum.StrEnum` (its values
are what the store persists and ``dbsync ctl`` shows) whose docstring draws it, and a
table of the moves it allows. Code that changes a state asks :func:`check_transition`
first, so that a move the diagram does not draw is a bug that raises
:class:`IllegalTransition` where it happens, not a puzzling row found later.

The machines
    * :class:`AudienceState`: an audience as the operator sees it.
    * :class:`BatchState`: a batch's way through the Data Import API.
    * :class:`DestinationState`: whether a destination's actors may call Demandbase.
    * :class:`ImportJobState` and :class:`ExportJobState`: Demandbase's own job states,
      as the client reads them; Demandbase moves them, dbsync only compares them.
    * :class:`ReconcileRunState`: one read-back's row in the store.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

__all__ = [
    "TRANSITIONS",
    "AudienceState",
    "BatchState",
    "DestinationState",
    "ExportJobState",
    "IllegalTransition",
    "ImportJobState",
    "ReconcileRunState",
    "check_transition",
    "export_job_state",
    "import_job_state",
]


class IllegalTransition(RuntimeError):
    """A state was asked to move along an edge its machine does not have."""

    def __init__(self, machine: str, current: str, new: str) -> None:
        self.machine = machine
        self.current = current
        self.new = new
        super().__init__(f"{machine}: {current} -> {new} is not a transition")


class AudienceState(enum.StrEnum):
    """An audience as the operator sees it (``dbsync ctl status``)::

    ┌──────────> active <──pause/resume──> paused <─────────┐
    │   calls keep │  │ destination stopped  │  │           │
    │      failing v  v (401/403)            v  v           │
    ├── success ─ failed <────────────────> stopped ── success
    │   or resume    (the supervisor's restart budget spent: failed too)
    └── reactivated ── deactivated <── any (no longer in the configuration)

    any but deactivated ──a job fed another list──> contract_broken ──ctl resume──> active
    """

    ACTIVE = "active"  # its actor delivers
    PAUSED = "paused"  # operator paused it; changes are still accepted and stored
    FAILED = "failed"  # its actor keeps failing, or crashed past its restart budget
    STOPPED = "stopped"  # its destination stopped (auth_failed, permission_denied)
    DEACTIVATED = "deactivated"  # no longer in the config; its list is left as it is
    # A completed job reported another list than the audience's (A1 broken): nothing
    # more is sent until an operator has looked at the tenant and resumes it.
    CONTRACT_BROKEN = "contract_broken"


class BatchState(enum.StrEnum):
    """A batch's way through the Data Import API::

        planned ──create job──> created ──upload 2xx──> uploaded ──job completed──> completed
           │                       │  └──job had the data──┘  └──job failed──> failed
           └───────────────────────┴── 400 split / give up / vanished ──> abandoned
                                                   (uploaded: vanished ──> failed)

    ``failed`` and ``abandoned`` put their accounts back in the dirty set (or, for
    a row isolated by bisection, aside as rejected).
    """

    PLANNED = "planned"
    CREATED = "created"
    UPLOADED = "uploaded"
    COMPLETED = "completed"
    FAILED = "failed"
    ABANDONED = "abandoned"

    @property
    def is_open(self) -> bool:
        return self in (BatchState.PLANNED, BatchState.CREATED, BatchState.UPLOADED)


class DestinationState(enum.StrEnum):
    """Whether a destination's actors may call Demandbase::

        running ──401 a fresh token does not cure──> auth_failed ───┐
           ^  └──────────────403──────────────────> permission_denied
           └──── a probe succeeds, or a reload ─────────────────────┘

    A stopped destination holds its actors' work (nothing is dropped); they probe it
    again now and then, since a permission granted in Demandbase needs no change here.
    """

    RUNNING = "running"
    AUTH_FAILED = "auth_failed"
    PERMISSION_DENIED = "permission_denied"


class ImportJobState(enum.StrEnum):
    """A Data Import job, as Demandbase reports it::

        new ──upload──> processing ──> completed
                             └───────> failed

    ``completed`` is the only acknowledgment Demandbase gives.
    """

    NEW = "new"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class ExportJobState(enum.StrEnum):
    """A Data Export job, as Demandbase reports it::

    accepted ──> processing ──> finished (results_url set)
        └────────────┴────────> failed
    """

    ACCEPTED = "accepted"
    PROCESSING = "processing"
    FINISHED = "finished"
    FAILED = "failed"


class ReconcileRunState(enum.StrEnum):
    """One read-back's row in the store::

        exporting ──judgment applied──> applied ──report kept──> completed
            └──────export or download failed──────> failed

    ``applied`` is the crash window between judging the list (repairs are committed)
    and keeping the report: a restart must not judge the same export twice.
    """

    EXPORTING = "exporting"
    APPLIED = "applied"
    COMPLETED = "completed"
    FAILED = "failed"


_S = TypeVar("_S", bound=enum.StrEnum)


def import_job_state(text: str | None) -> ImportJobState | None:
    """The import job state Demandbase names, whatever its case; None if unknown."""
    try:
        return ImportJobState((text or "").strip().lower())
    except ValueError:
        return None


def export_job_state(text: str | None) -> ExportJobState | None:
    """The export job state Demandbase names, whatever its case; None if unknown."""
    try:
        return ExportJobState((text or "").strip().lower())
    except ValueError:
        return None


_A = AudienceState
_B = BatchState
_D = DestinationState
_I = ImportJobState
_E = ExportJobState
_R = ReconcileRunState

#: The moves each machine allows, from each state; staying put is always allowed.
TRANSITIONS: Mapping[type[enum.StrEnum], Mapping[enum.StrEnum, frozenset[enum.StrEnum]]] = {
    AudienceState: {
        _A.ACTIVE: frozenset(
            {_A.PAUSED, _A.FAILED, _A.STOPPED, _A.DEACTIVATED, _A.CONTRACT_BROKEN}
        ),
        _A.PAUSED: frozenset(
            {_A.ACTIVE, _A.FAILED, _A.STOPPED, _A.DEACTIVATED, _A.CONTRACT_BROKEN}
        ),
        _A.FAILED: frozenset(
            {_A.ACTIVE, _A.PAUSED, _A.STOPPED, _A.DEACTIVATED, _A.CONTRACT_BROKEN}
        ),
        _A.STOPPED: frozenset(
            {_A.ACTIVE, _A.PAUSED, _A.FAILED, _A.DEACTIVATED, _A.CONTRACT_BROKEN}
        ),
        _A.DEACTIVATED: frozenset({_A.ACTIVE, _A.PAUSED}),
        _A.CONTRACT_BROKEN: frozenset({_A.ACTIVE, _A.PAUSED, _A.DEACTIVATED}),
    },
    BatchState: {
        _B.PLANNED: frozenset({_B.CREATED, _B.ABANDONED}),
        _B.CREATED: frozenset({_B.UPLOADED, _B.ABANDONED}),
        _B.UPLOADED: frozenset({_B.COMPLETED, _B.FAILED, _B.ABANDONED}),
        _B.COMPLETED: frozenset(),
        _B.FAILED: frozenset(),
        _B.ABANDONED: frozenset(),
    },
    DestinationState: {
        _D.RUNNING: frozenset({_D.AUTH_FAILED, _D.PERMISSION_DENIED}),
        _D.AUTH_FAILED: frozenset({_D.RUNNING}),
        _D.PERMISSION_DENIED: frozenset({_D.RUNNING}),
    },
    ImportJobState: {
        _I.NEW: frozenset({_I.PROCESSING, _I.COMPLETED, _I.FAILED}),
        _I.PROCESSING: frozenset({_I.COMPLETED, _I.FAILED}),
        _I.COMPLETED: frozenset(),
        _I.FAILED: frozenset(),
    },
    ExportJobState: {
        _E.ACCEPTED: frozenset({_E.PROCESSING, _E.FINISHED, _E.FAILED}),
        _E.PROCESSING: frozenset({_E.FINISHED, _E.FAILED}),
        _E.FINISHED: frozenset(),
        _E.FAILED: frozenset(),
    },
    ReconcileRunState: {
        _R.EXPORTING: frozenset({_R.APPLIED, _R.FAILED}),
        _R.APPLIED: frozenset({_R.COMPLETED}),
        _R.COMPLETED: frozenset(),
        _R.FAILED: frozenset(),
    },
}


def check_transition(current: _S, new: _S) -> _S:
    """``new``, if its machine allows moving there from ``current``; else raise.

    Raises:
        IllegalTransition: the machine's diagram has no such edge.
    """
    machine = type(current)
    if type(new) is not machine:
        raise IllegalTransition(machine.__name__, current, f"{type(new).__name__}.{new.name}")
    if new is not current and new not in TRANSITIONS[machine][current]:
        raise IllegalTransition(machine.__name__, current, new)
    return new
