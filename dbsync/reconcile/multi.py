"""Many lists per export job [A5]: which audiences one job reads, and the volume spent.

Demandbase's account-list export takes up to :data:`MAX_LISTS_PER_EXPORT` list ids in
one job, within a daily volume of results (429-101). When the destination's contract
shows that a multi-list results file says which list each row belongs to
(``multi_list_exports``), the reconciler starts at most one job every :func:`gap`
seconds (the day's exports spread evenly), naming every audience due whose list still
fits in today's volume. Each audience's interval is shortened (:func:`settings_within`)
so that it is read back within ``verify_within_hours``.

Pure, but for :class:`ExportVolume`, the bytes of results downloaded in today's quota
window by our count (estimated from list sizes before a job, charged after).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import msgspec

from dbsync.config import ReconcileSettings
from dbsync.demandbase import wire
from dbsync.model import ListedAccount, ReconcileFacts

__all__ = [
    "MAX_LISTS_PER_EXPORT",
    "ExportVolume",
    "MultiListExportClient",
    "choose_group",
    "gap",
    "settings_within",
]

# Lists one export job may name (``accountListIds``) [DOC].
MAX_LISTS_PER_EXPORT = 10_000
# Bytes a results row takes, until a download says: four columns of a few dozen bytes.
BYTES_PER_ROW_GUESS = 100.0
# Rows of a list no read-back has counted yet, for the volume estimate.
ROWS_GUESS = 10_000


@runtime_checkable
class MultiListExportClient(Protocol):
    """Exports of many lists in one job [A5]: a client without them reads one at a time."""

    async def create_account_lists_export(
        self, job_name: str, account_list_ids: list[int]
    ) -> wire.ExportJobDetails: ...

    async def read_export_accounts_by_list(
        self, results_url: str
    ) -> tuple[dict[int, list[ListedAccount]], int]: ...


def gap(day_seconds: float, per_day: int) -> float:
    """Seconds between two multi-list export jobs: the day's exports spread evenly."""
    return day_seconds / max(1, per_day)


def settings_within(settings: ReconcileSettings, gap_seconds: float) -> ReconcileSettings:
    """``settings`` with the interval shortened so that an audience due waits at most one
    gap for a job and is read back within ``verify_within_hours``."""
    window = settings.verify_within_hours * 3_600.0
    interval = max(gap_seconds, min(settings.interval_seconds, window - 2 * gap_seconds))
    return msgspec.structs.replace(settings, interval_seconds=interval)


def choose_group(
    order: Sequence[ReconcileFacts], cost: Callable[[str], int], left: int
) -> tuple[list[ReconcileFacts], int]:
    """The audiences of the next job, in turn order, while their estimated bytes fit in
    ``left``; and the volume left after them (negative: not even the first fits)."""
    group: list[ReconcileFacts] = []
    for turn in order[:MAX_LISTS_PER_EXPORT]:
        bytes_ = cost(turn.audience_id)
        if group and bytes_ > left:
            break
        group.append(turn)
        left -= bytes_
    return group, left


class ExportVolume:
    """The export volume spent in today's quota window, by our count."""

    def __init__(self, bytes_per_day: int) -> None:
        self.bytes_per_day = bytes_per_day
        self.bytes_per_row = BYTES_PER_ROW_GUESS
        self._window = -1
        self._used = 0

    def left(self, window: int, margin: float) -> int:
        """Bytes the day's volume still allows in quota window ``window``, less ``margin``."""
        if self._window != window:
            self._window, self._used = window, 0
        return int(self.bytes_per_day * (1.0 - margin)) - self._used

    def charge(self, window: int, size: int) -> None:
        """A results file of ``size`` bytes was downloaded in quota window ``window``."""
        self.left(window, 0.0)  # rolls the window
        self._used += size

    def learn(self, size: int, rows: int) -> None:
        """A results file of ``size`` bytes held ``rows`` rows: the estimate follows it."""
        if rows:
            self.bytes_per_row = size / rows

    def estimate(self, rows: int | None) -> int:
        """Bytes a list of ``rows`` members (None: never counted) will take."""
        return int(max(1, ROWS_GUESS if rows is None else rows) * self.bytes_per_row)
