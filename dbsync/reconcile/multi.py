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

import math
from collections.abc import Awaitable, Callable, Sequence
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
    "row_cap",
    "settings_within",
]

# Lists one export job may name (``accountListIds``) [DOC].
MAX_LISTS_PER_EXPORT = 10_000
# Bytes a results row takes, until a download says: four columns of a few dozen bytes.
BYTES_PER_ROW_GUESS = 100.0
# Rows of a list no read-back has counted yet, for the estimates.
ROWS_GUESS = 10_000
# Rows below which a job is not split: a fraction of a second of judging.
MIN_ROWS_PER_EXPORT = 100_000


@runtime_checkable
class MultiListExportClient(Protocol):
    """Exports of many lists in one job [A5]: a client without them reads one at a time."""

    async def create_account_lists_export(
        self, job_name: str, account_list_ids: list[int]
    ) -> wire.ExportJobDetails: ...

    async def read_export_accounts_by_list(
        self, results_url: str, *, before_reading: Callable[[], Awaitable[None]] | None = None
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


def row_cap(total_rows: int, jobs_per_window: int) -> int:
    """Rows (estimated) one export job may carry: every list's rows spread over half the
    jobs ``verify_within_hours`` allows (the other half is left for ``ctl reconcile``,
    failed jobs and audiences falling due between), and never fewer than
    :data:`MIN_ROWS_PER_EXPORT`. Jobs of that size are judged in a small part of the
    window, one while the next is exported, instead of one file of every list."""
    share = max(1, jobs_per_window // 2)
    return max(MIN_ROWS_PER_EXPORT, math.ceil(total_rows / share))


def choose_group(
    order: Sequence[ReconcileFacts],
    rows: Callable[[str], int],
    *,
    bytes_per_row: float,
    bytes_left: int,
    max_rows: int,
) -> tuple[list[ReconcileFacts], int]:
    """The audiences of the next job, in turn order, while their estimated rows stay
    within ``max_rows`` and their bytes within ``bytes_left`` (the first always goes);
    and the bytes left after them (negative: not even the first fits today)."""
    group: list[ReconcileFacts] = []
    taken = 0
    for turn in order[:MAX_LISTS_PER_EXPORT]:
        n = rows(turn.audience_id)
        cost = int(n * bytes_per_row)
        if group and (cost > bytes_left or taken + n > max_rows):
            break
        group.append(turn)
        taken += n
        bytes_left -= cost
    return group, bytes_left


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

    @property
    def used(self) -> int:
        """Bytes charged in the current quota window."""
        return self._used

    def load(self, window: int, used: int) -> None:
        """Bytes spent in quota window ``window`` as the store kept them (at a start)."""
        self._window, self._used = window, used

    def charge(self, window: int, size: int) -> None:
        """A results file of ``size`` bytes was downloaded in quota window ``window``."""
        self.left(window, 0.0)  # rolls the window
        self._used += size

    def learn(self, size: int, rows: int) -> None:
        """A results file of ``size`` bytes held ``rows`` rows: the estimate follows it."""
        if rows:
            self.bytes_per_row = size / rows

    def estimate(self, rows: int) -> int:
        """Bytes a results file of ``rows`` rows will take."""
        return int(max(1, rows) * self.bytes_per_row)
