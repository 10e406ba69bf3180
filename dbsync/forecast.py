"""When today's backlog will be delivered: a pure forecast from backlogs and budgets.

For each audience of one destination, and for the destination as a whole, the time
by which the accounts pending now will have been carried by completed import jobs,
under the destination's daily budgets. Nothing here reads a clock or a store: the
inputs are numbers (:class:`Capacity`, :class:`Load`), so that the forecast is tested
with numbers and computed alike by ``dbsync ctl status``, ``dbsync ctl plan`` and the
``audience_summary`` lines.

The model, and what it leaves out:

* **Jobs.** An audience's backlog is ``ceil(inserts / rows_per_job) +
  ceil(deletes / rows_per_job)`` import jobs (inserts and deletes never share a job).
  Each job costs one creation, one upload and :data:`STATUS_READS_PER_JOB` status reads
  (the first poll waits the learned job duration, so one or two reads each), and is
  done ``job_seconds`` (the learned duration) after it starts.
* **Daily quotas.** A window (a day of ``day_seconds``) starts at most
  ``jobs_per_day`` jobs: the fewest the creation, upload and status quotas allow; the
  current one only what is left of today. No job starts in the last ``edge_seconds``
  of a window (the budget's edge): those wait for the next window, as the budget does.
* **Pace.** Within a window, jobs start at most at ``slots / job_seconds`` a second
  and at ``pace / 60 / REQUESTS_PER_JOB``, where ``slots`` is the destination's job
  slots as far as the audiences still waiting may hold them (each at most
  ``max_jobs_in_flight``) and ``pace`` the destination's request pace as far as their
  own ``requests_per_minute`` allow. After 429s halved the pace, it climbs back as
  the budget's does (a step every ``pace_recovery_seconds``), assuming no new 429.
* **The other audiences' share.** The forecast starts each job at the earliest the
  slots, the pace and the quota allow, and gives it by turns, as the budget does
  (:mod:`dbsync.budget`): to the audience waiting longest, counted from its oldest
  pending change or, once it had a job, from that job's start. So with N audiences
  waiting each gets one job before any gets a second, and a large backlog's last job
  comes after every smaller one's. An audience already running its
  ``max_jobs_in_flight`` leaves the next slot to another, as its actor does by not
  asking.
* **Not due yet.** A backlog smaller than ``rows_per_job`` waits until its oldest
  change is ``max_age_seconds`` old.
* **Left out.** Jobs already in flight hold their slots and are counted done
  ``job_seconds`` from now (we do not know when they started); failed jobs sent
  again, split batches, rows refused, set-aside accounts tried again (which use only
  quota nobody waits for) and changes arriving later are not forecast. A held
  audience (paused, or its contract broken) has no time: nothing of it is sent until
  ``ctl resume``.
* **Depth.** Jobs are simulated one by one up to :data:`MAX_SIMULATED_JOBS`; past
  them the rest flow window by window, shared as the simulation shares them, so that
  a backlog of months costs little more than one of weeks (``bench/forecast.py``).

The bound the tests hold it to (``tests/integration/test_forecast_days.py``): with a
backlog of several days under a small daily job quota, the window the forecast names
at the start is the window the last job completes in, give or take one.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import math
from collections.abc import Sequence

import msgspec

__all__ = [
    "MAX_SIMULATED_JOBS",
    "REQUESTS_PER_JOB",
    "STATUS_READS_PER_JOB",
    "AudienceEta",
    "Capacity",
    "DestinationEta",
    "Load",
    "forecast",
    "jobs_needed",
]

# Status reads of one import job: the first poll waits the learned duration.
STATUS_READS_PER_JOB = 2
# Requests one job makes at the destination's pace: creation, upload, status reads.
REQUESTS_PER_JOB = 2 + STATUS_READS_PER_JOB
# Jobs simulated one by one at most (17 days at the default quotas; about 70 ms): the
# rest are counted in whole windows, which at that depth is what binds them.
MAX_SIMULATED_JOBS = 20_000
# The shortest job the forecast believes in (as :class:`dbsync.retry.LearnedDuration`).
_SHORTEST_JOB_SECONDS = 0.05


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """One destination's room for import jobs, as its budget stands ``now``."""

    now: float  # epoch seconds
    day_seconds: float
    jobs_left_today: int  # jobs the current window still allows (creations, uploads, reads)
    jobs_per_day: int  # jobs a whole window allows
    pace_per_minute: float  # the destination's request pace now (lower after 429s)
    # After 429s the pace climbs back by ``pace_recovery_step`` every
    # ``pace_recovery_seconds`` up to ``pace_limit_per_minute`` (None: it stays).
    pace_limit_per_minute: float | None = None
    pace_recovery_step: float = 0.0
    pace_recovery_seconds: float = 60.0
    job_slots: int  # concurrent import jobs
    edge_seconds: float  # no quota-counted request starts this close to a window's end


class Load(msgspec.Struct, frozen=True, kw_only=True):
    """One audience's backlog and what its actor may do with it."""

    audience_id: str
    inserts: int  # pending accounts to add, not in flight
    deletes: int  # pending accounts to remove, not in flight
    in_flight: int = 0  # accounts in open batches
    jobs_in_flight: int = 0  # its import jobs running now (they hold job slots)
    oldest_changed_at: float | None = None  # epoch seconds of its oldest pending change
    last_turn: float | None = None  # epoch seconds its last job slot was granted
    rows_per_job: int = 10_000  # max_records
    max_jobs_in_flight: int = 2
    requests_per_minute: float = math.inf  # the audience's own pace
    max_age_seconds: float = 60.0
    job_seconds: float = 5.0  # learned job duration
    held: bool = False  # paused or contract broken: nothing is sent


class AudienceEta(msgspec.Struct, frozen=True, kw_only=True):
    audience_id: str
    jobs: int  # import jobs its pending backlog needs
    eta: float | None  # epoch seconds by when it is delivered; None: nothing pending, held,
    # or no quota at all
    window: int | None  # the quota window ``eta`` falls in (epoch // day_seconds)
    starts: tuple[float, ...] = ()  # when its first jobs may start (at most ``starts_wanted``)
    held: bool = False


class DestinationEta(msgspec.Struct, frozen=True, kw_only=True, dict=True):
    jobs: int
    eta: float | None  # the latest audience's; None: nothing to deliver
    window: int | None
    audiences: tuple[AudienceEta, ...]

    def of(self, audience_id: str) -> AudienceEta | None:
        return self._by_id.get(audience_id)

    @functools.cached_property
    def _by_id(self) -> dict[str, AudienceEta]:
        # Built once: a summary round and ``ctl status`` ask for every audience, and a
        # search each time made them quadratic (10,000 audiences: ~1.5 CPU s a round).
        return {audience.audience_id: audience for audience in self.audiences}


def jobs_needed(load: Load) -> int:
    rows = max(1, load.rows_per_job)
    return math.ceil(load.inserts / rows) + math.ceil(load.deletes / rows)


def forecast(
    capacity: Capacity, loads: Sequence[Load], *, starts_wanted: int = 0
) -> DestinationEta:
    """The time each backlog of ``loads`` is delivered, served by turns.

    ``starts_wanted``: how many of each audience's first job start times to return
    (``dbsync ctl plan`` shows them).
    """
    day = capacity.day_seconds
    order = sorted(
        (load for load in loads if not load.held and jobs_needed(load) > 0),
        key=lambda load: (
            load.oldest_changed_at if load.oldest_changed_at is not None else math.inf,
            load.audience_id,
        ),
    )
    runs = [_Run(rank, load, capacity.now) for rank, load in enumerate(order)]
    if capacity.jobs_per_day > 0:
        _simulate(capacity, runs, starts_wanted)
    results: dict[str, AudienceEta] = {}
    for run in runs:
        eta = run.last_end if run.left == 0 else None
        results[run.load.audience_id] = AudienceEta(
            audience_id=run.load.audience_id,
            jobs=run.jobs,
            eta=eta,
            window=math.floor(eta / day) if eta is not None else None,
            starts=tuple(run.starts),
        )
    audiences = []
    for load in loads:
        found = results.get(load.audience_id)
        if found is None:
            in_flight_eta = (
                capacity.now + max(_SHORTEST_JOB_SECONDS, load.job_seconds)
                if load.in_flight > 0 and not load.held
                else None
            )
            found = AudienceEta(
                audience_id=load.audience_id,
                jobs=jobs_needed(load),
                eta=in_flight_eta,
                window=math.floor(in_flight_eta / day) if in_flight_eta is not None else None,
                held=load.held,
            )
        audiences.append(found)
    etas = [a.eta for a in audiences if a.eta is not None]
    latest = max(etas) if etas else None
    return DestinationEta(
        jobs=sum(a.jobs for a in audiences),
        eta=latest,
        window=math.floor(latest / day) if latest is not None else None,
        audiences=tuple(audiences),
    )


def _pace_at(capacity: Capacity, at: float) -> float:
    """The destination's pace at ``at``, climbing back after 429s as the budget's does."""
    limit = capacity.pace_limit_per_minute
    if limit is None or capacity.pace_per_minute >= limit:
        return capacity.pace_per_minute
    periods = math.floor(max(0.0, at - capacity.now) / max(capacity.pace_recovery_seconds, 1e-9))
    return min(limit, capacity.pace_per_minute + capacity.pace_recovery_step * periods)


class _Run:
    """One audience's jobs as the simulation schedules them."""

    def __init__(self, rank: int, load: Load, now: float) -> None:
        self.rank = rank
        self.load = load
        self.jobs = self.left = jobs_needed(load)
        self.job_seconds = max(_SHORTEST_JOB_SECONDS, load.job_seconds)
        # Its jobs running, by end (at most max_jobs_in_flight); those running now are
        # done a job's duration from now (their start is unknown).
        self.ends: list[float] = [now + self.job_seconds] * load.jobs_in_flight
        self.starts: list[float] = []
        # Jobs in flight now are done a job's duration from now (their start is unknown).
        self.last_end = now + self.job_seconds if load.in_flight > 0 else now
        self.next_start = now  # its own pace
        # Its place in the budget's turns: its oldest change (one in the future counts
        # as now), then the start of its last job.
        oldest = load.oldest_changed_at
        self.turn = min(oldest, now) if oldest is not None else now
        if load.last_turn is not None:
            self.turn = max(self.turn, min(load.last_turn, now))
        pending = load.inserts + load.deletes
        if pending < load.rows_per_job and load.oldest_changed_at is not None:
            self.next_start = max(now, load.oldest_changed_at + load.max_age_seconds)

    def free_at(self) -> float:
        """The earliest its own limits (jobs in flight, pace) let its next job start."""
        if len(self.ends) >= max(1, self.load.max_jobs_in_flight):
            return max(self.next_start, self.ends[0])
        return self.next_start


def _simulate(capacity: Capacity, runs: list[_Run], starts_wanted: int) -> None:
    """Start every job at the earliest the slots, the pace and the quota allow; among
    the audiences that may start one then, the one waiting longest goes first."""
    day = capacity.day_seconds
    # When each slot is free: those the jobs running now hold, after them.
    busy = sorted(end for run in runs for end in run.ends)
    slots = [capacity.now] * max(1, capacity.job_slots)
    for i, end in enumerate(busy[: len(slots)]):
        slots[i] = end
    heapq.heapify(slots)
    next_pace = capacity.now
    window = math.floor(capacity.now / day)
    left = max(0, capacity.jobs_left_today)
    # (turn, rank, index) of the audiences free to start a job: the earliest turn first.
    ready: list[tuple[float, int, int]] = []
    blocked = [(run.free_at(), run.rank, i) for i, run in enumerate(runs)]
    heapq.heapify(blocked)
    budget = MAX_SIMULATED_JOBS
    at = capacity.now
    while (ready or blocked) and budget > 0:
        at = max(slots[0], next_pace)
        while blocked and blocked[0][0] <= at:
            _, rank, i = heapq.heappop(blocked)
            heapq.heappush(ready, (runs[i].turn, rank, i))
        if not ready:
            free, rank, i = heapq.heappop(blocked)
            at = max(at, free)
            heapq.heappush(ready, (runs[i].turn, rank, i))
        # The quota: no start in the window's edge, none past its jobs.
        while left <= 0 or at >= (window + 1) * day - capacity.edge_seconds or at < window * day:
            if at >= (window + 1) * day - capacity.edge_seconds or left <= 0:
                window = max(window + 1, math.floor(at / day))
                at = max(at, window * day)
                left = capacity.jobs_per_day
            else:
                window = math.floor(at / day)
        _, _, i = heapq.heappop(ready)
        run = runs[i]
        run.turn = max(run.turn, at)
        end = at + run.job_seconds
        heapq.heapreplace(slots, end)
        next_pace = at + 60.0 * REQUESTS_PER_JOB / max(_pace_at(capacity, at), 1e-9)
        left -= 1
        budget -= 1
        run.left -= 1
        run.last_end = max(run.last_end, end)
        if len(run.starts) < starts_wanted:
            run.starts.append(at)
        if len(run.ends) >= max(1, run.load.max_jobs_in_flight):
            heapq.heapreplace(run.ends, end)
        else:
            heapq.heappush(run.ends, end)
        own_pace = run.load.requests_per_minute
        run.next_start = at + (60.0 * REQUESTS_PER_JOB / own_pace if own_pace > 0 else 0.0)
        if run.left > 0:
            heapq.heappush(blocked, (run.free_at(), run.rank, i))
    _extrapolate(capacity, [run for run in runs if run.left > 0], window, left, at)


def _extrapolate(capacity: Capacity, runs: list[_Run], window: int, left: int, at: float) -> None:
    """The jobs past :data:`MAX_SIMULATED_JOBS`, counted rather than placed one by one.

    Turns go round: each audience still waiting has one job a round, in the order of
    its turn, until its backlog is done. So an audience with ``r`` jobs left has its
    last one as job number ``sum(min(r_j, r - 1)) + (those before it in the round with
    r_j >= r) + 1`` of the rest, and the rest flow at a window's share of jobs (its
    quota, at most what the slots and the pace allow in it), spread evenly over it.
    """
    if not runs:
        return
    day = capacity.day_seconds
    usable = max(0.0, day - capacity.edge_seconds)
    mean_seconds = sum(run.job_seconds for run in runs) / len(runs)
    pace_rate = max(_pace_at(capacity, at), 1e-9) / 60.0 / REQUESTS_PER_JOB
    rate = min(pace_rate, max(1, capacity.job_slots) / mean_seconds)
    per_window = max(1e-9, min(float(capacity.jobs_per_day), usable * rate))
    segment_end = (window + 1) * day - capacity.edge_seconds
    room = float(max(0, min(left, math.floor(max(0.0, segment_end - at) * rate))))

    def start_of(job: int) -> float:
        """When the ``job``-th job of the rest (1-based) starts."""
        if job <= room:
            return at + (segment_end - at) * (job - 1) / max(room, 1.0)
        later = (job - room - 1) / per_window
        whole = math.floor(later)
        return (window + 1 + whole) * day + usable * (later - whole)

    order = sorted(runs, key=lambda run: (run.turn, run.rank))
    sizes = sorted(run.left for run in order)
    below = list(itertools.accumulate(sizes, initial=0))  # below[k]: sum of sizes[:k]
    seen: list[int] = []  # the sizes of the audiences before, in the round's order
    for run in order:
        r = run.left
        fewer = bisect.bisect_left(sizes, r)  # audiences with fewer than r jobs left
        # Every audience's jobs in the r - 1 whole rounds before (capped at r - 1).
        rounds = below[fewer] + (len(sizes) - fewer) * (r - 1)
        # In its last round: those before it in turn order with a job left then.
        ahead = len(seen) - bisect.bisect_left(seen, r)
        last_job = rounds + ahead + 1
        run.last_end = max(run.last_end, start_of(last_job) + run.job_seconds)
        run.left = 0
        bisect.insort(seen, r)
