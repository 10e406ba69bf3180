"""The run-time checks of the contract: each answer is looked at, whatever a probe said.

A1 (a job feeds the list named by its ``dataImportName``) and A2 (a completed job says
which list it fed) cannot be proven once and for all: a tenant could change, or the
probe could be wrong. So every completed import job is held against the list id the
audience learned (or was configured with): a job that reports another id fed another
list, most likely one it created, and the audience must stop sending before a job per
batch makes a stray list per batch (:func:`list_breach`).

Job states are compared case-insensitively; a state nobody knows is polled like
``processing`` until :class:`UnknownStateWatch` says it lasted too long, and is then
treated as ``failed`` (so that a renamed state cannot make dbsync poll forever,
spending status reads).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "UNKNOWN_STATE_DEADLINE_SECONDS",
    "UnknownStateWatch",
    "list_breach",
]

#: How long a job may stay in a state dbsync does not know before it counts as failed:
#: an hour, long beyond the minutes an import or export takes in the documents' words,
#: short enough that the same rows are tried again (or set aside) the same day.
UNKNOWN_STATE_DEADLINE_SECONDS: Final = 3_600.0


def list_breach(learned: int | None, reported: int | None) -> str | None:
    """Why a completed job's list id breaks A1, or None.

    ``learned`` is the id the audience is known to feed (configured, or reported by
    its earlier jobs); ``reported`` the completed job's ``accountListId``. No learned
    id yet: the first one reported is the audience's list. No reported id: A2 does
    not hold for this tenant, nothing can be compared (the probe says so).
    """
    if learned is None or reported is None or learned == reported:
        return None
    return (
        f"a completed job fed list {reported}, not the audience's list {learned}:"
        " Demandbase did not feed the list named by the job [A1]"
    )


class UnknownStateWatch:
    """Since when one job has been in states dbsync does not know."""

    def __init__(self, deadline_seconds: float = UNKNOWN_STATE_DEADLINE_SECONDS) -> None:
        self.deadline_seconds = deadline_seconds
        self.state = ""
        self._since: float | None = None

    def expired(self, state: str, known: bool, now: float) -> bool:
        """Whether the job, now in ``state``, has been in unknown states past the deadline."""
        if known:
            self._since = None
            return False
        self.state = state
        if self._since is None:
            self._since = now
        return now - self._since >= self.deadline_seconds
