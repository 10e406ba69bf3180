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
  slots, the pace and the quota allow, and gives it to the oldest backlog that may
  start one then: an audience already running its ``max_jobs_in_flight`` leaves the
  next slot to a younger one, as its actor does by not asking. The budget takes turns
  instead (:mod:`dbsync.budget`): an audience that just had a job waits behind every
  audience already waiting, so under contention a large backlog's last job comes
  later, and a small one's sooner, than forecast here. The destination's time is the
  same either way; each audience's is not (yet) modelled on turns.
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

import functools
import heapq
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
    """The time each backlog of ``loads`` is delivered, served oldest backlog first.

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
    the audiences that may start one then, the oldest backlog goes first."""
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
    ready: list[tuple[int, int]] = []  # (rank, index) of audiences free to start a job
    blocked = [(run.free_at(), run.rank, i) for i, run in enumerate(runs)]
    heapq.heapify(blocked)
    budget = MAX_SIMULATED_JOBS
    at = capacity.now
    while (ready or blocked) and budget > 0:
        at = max(slots[0], next_pace)
        while blocked and blocked[0][0] <= at:
            _, rank, i = heapq.heappop(blocked)
            heapq.heappush(ready, (rank, i))
        if not ready:
            free, rank, i = heapq.heappop(blocked)
            at = max(at, free)
            heapq.heappush(ready, (rank, i))
        # The quota: no start in the window's edge, none past its jobs.
        while left <= 0 or at >= (window + 1) * day - capacity.edge_seconds or at < window * day:
            if at >= (window + 1) * day - capacity.edge_seconds or left <= 0:
                window = max(window + 1, math.floor(at / day))
                at = max(at, window * day)
                left = capacity.jobs_per_day
            else:
                window = math.floor(at / day)
        _, i = heapq.heappop(ready)
        run = runs[i]
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
    """The jobs past :data:`MAX_SIMULATED_JOBS`, as a flow rather than one by one.

    Each window carries its quota of jobs (at most what the slots and the pace allow
    in it), shared by the oldest backlogs that fill the job slots, each in proportion
    to the jobs it may run at once over its job duration, as the simulation shares
    them; an audience done, the next oldest takes its place.
    """
    if not runs:
        return
    day = capacity.day_seconds
    usable = max(0.0, day - capacity.edge_seconds)
    slots = max(1, capacity.job_slots)
    queue = sorted(runs, key=lambda r: r.rank)
    remaining = {id(run): float(run.left) for run in queue}
    mean_seconds = sum(run.job_seconds for run in queue) / max(1, len(queue))
    pace_rate = max(_pace_at(capacity, at), 1e-9) / 60.0 / REQUESTS_PER_JOB
    per_window = min(float(capacity.jobs_per_day), usable * min(pace_rate, slots / mean_seconds))
    # The segment of time the current window's jobs are spread over.
    seg_start, seg_end = at, (window + 1) * day - capacity.edge_seconds
    room = float(min(left, per_window))
    done = 0.0  # jobs of this segment already placed
    while queue:
        active, held = [], 0
        for run in queue:
            active.append(run)
            held += max(1, run.load.max_jobs_in_flight)
            if held >= slots:
                break
        weights = [max(1, r.load.max_jobs_in_flight) / r.job_seconds for r in active]
        total = sum(weights)
        # Jobs of this segment placed when the first active audience is done.
        first = min(remaining[id(r)] * total / w for r, w in zip(active, weights, strict=True))
        if room - done <= 1e-9 or seg_start >= seg_end:
            window += 1
            seg_start, seg_end = window * day, (window + 1) * day - capacity.edge_seconds
            room, done = per_window, 0.0
            continue
        step = min(first, room - done)
        for r, w in zip(active, weights, strict=True):
            remaining[id(r)] -= step * w / total
        done += step
        for r in active:
            if remaining[id(r)] <= 1e-6:
                start = seg_start + (seg_end - seg_start) * (done - 1) / max(room, 1.0)
                r.last_end = max(r.last_end, max(start, seg_start) + r.job_seconds)
                r.left = 0
                queue.remove(r)
