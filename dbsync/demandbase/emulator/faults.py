"""The faults in force, and the seeded draws that decide which request or job meets one.

:class:`FaultState` holds the current :class:`~dbsync.demandbase.emulator.settings.Faults`
(replaced whole by ``POST /_emulator/faults``) and the storm's remaining count. Each
kind of draw has its own RNG seeded from the settings' ``seed``, so that one kind of
fault does not shift another's sequence:

- per request, :meth:`FaultState.draw` consumes exactly two numbers from the request
  RNG whatever the ratios are, so the n-th request meets the same fate for one seed;
- per job, drops and failure come from an RNG seeded with the seed and the job's id,
  so the same job (same id, same file) loses the same rows in every run.
"""

from __future__ import annotations

import enum
import random

import msgspec

from dbsync.demandbase.emulator.settings import Dialect, Faults, StatusStorm

__all__ = ["FaultState", "Injection"]


class Injection(enum.Enum):
    """What a fault does to one Demandbase request."""

    NONE = "none"
    STATUS = "status"  # answer an injected status before the request has any effect
    RESET = "reset"  # let the request take effect, then close the connection unanswered


class FaultState:
    """The current faults and the draws they cause."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self._seed = seed
        self._requests = random.Random(f"{seed}:requests")
        self._faults = faults
        self._storm_left = faults.status_storm.count if faults.status_storm else 0

    @property
    def current(self) -> Faults:
        """The faults in force; a storm shows the requests it has left (``None`` once over)."""
        storm = self._faults.status_storm
        if storm is None:
            return self._faults
        left = (
            StatusStorm(status=storm.status, count=self._storm_left) if self._storm_left else None
        )
        return msgspec.structs.replace(self._faults, status_storm=left)

    def replace(self, faults: Faults) -> None:
        self._faults = faults
        self._storm_left = faults.status_storm.count if faults.status_storm else 0

    @property
    def latency_seconds(self) -> float:
        return self._faults.latency_ms / 1000.0

    @property
    def retry_after_seconds(self) -> int | None:
        return self._faults.retry_after_seconds

    @property
    def reject_external_ids(self) -> frozenset[str]:
        return self._faults.reject_external_ids

    def speaks(self, dialect: Dialect) -> bool:
        """Whether ``dialect`` is in force now."""
        return dialect in self._faults.dialects

    def draw(self) -> tuple[Injection, int]:
        """The fate of the next Demandbase request: the injection and, for STATUS, its status."""
        error_draw, reset_draw = self._requests.random(), self._requests.random()
        storm = self._faults.status_storm
        if storm is not None and self._storm_left > 0:
            self._storm_left -= 1
            return Injection.STATUS, storm.status
        if error_draw < self._faults.error_ratio:
            return Injection.STATUS, self._faults.error_status
        if reset_draw < self._faults.reset_ratio:
            return Injection.RESET, 0
        return Injection.NONE, 0

    def import_fails(self, job_id: int) -> bool:
        """Whether import job ``job_id`` ends ``failed`` (``job_fail_ratio``)."""
        return self._job_fails(f"import:{job_id}")

    def export_fails(self, job_id: str) -> bool:
        """Whether export job ``job_id`` ends ``failed`` (``job_fail_ratio``)."""
        return self._job_fails(f"export:{job_id}")

    def dropped(self, job_id: int, matched: int) -> list[bool]:
        """For each of import job ``job_id``'s ``matched`` rows, whether it is dropped."""
        ratio = self._faults.drop_ratio
        if ratio <= 0:
            return [False] * matched
        rng = random.Random(f"{self._seed}:drop:{job_id}")
        return [rng.random() < ratio for _ in range(matched)]

    def _job_fails(self, job: str) -> bool:
        ratio = self._faults.job_fail_ratio
        return ratio > 0 and random.Random(f"{self._seed}:fail:{job}").random() < ratio
