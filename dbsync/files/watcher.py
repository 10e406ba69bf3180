"""The watched folder: the service that applies AEP file exports as they land.

Each poll, in this order:

1. list the folder (and its sub-folders, for the ``/%SEGMENT_ID%`` folder macro),
   leaving out hidden and partial uploads (``.name``, ``*.part``, ``*.filepart``,
   ``*.tmp``) and the files of runs already decided in this process;
2. group the data files into *runs* by audience and run key (:mod:`.names`), and read
   the manifests: a run a manifest lists is complete once every part it lists is there
   at its size; a run without one once each of its files has kept its size and time
   for ``settle_seconds`` (a file still being written is never read half);
3. take the complete runs oldest first, per audience, so that a late run is judged
   against the ones before it. A run's content hash (SHA-256 over its parts, in part
   order) is computed first: the same run decided before (say before a restart) is
   passed over, the same content applied under another name is skipped as a
   duplicate, a run older than the newest applied one is skipped as late;
4. read the run's parts in a worker thread, a chunk at a time, straight into the
   store's staging (:meth:`~dbsync.store.Store.apply_snapshot`), which applies it as
   one transaction of desired state and records the run with its hash in that same
   transaction: full mode through the removal guard, incremental mode as joins and
   leaves. A file that cannot be read refuses its run, with the reason;
5. delete the files of runs decided more than ``keep_days`` ago.

It runs in the daemon's TaskGroup until :meth:`stop`; a run cut short by a kill is
either recorded (applied whole, once) or not, and then read again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import msgspec

from dbsync.clock import Clock
from dbsync.config.schema import FileColumns, FileIngestSettings
from dbsync.errors import StoreError
from dbsync.files.formats import FileRefused, ReadCounts, Row, read_file
from dbsync.files.manifest import ManifestError, parse_manifest
from dbsync.files.names import FileName, is_manifest, parse_name
from dbsync.model import FileRun, FileRunInfo, SnapshotOutcome

__all__ = ["AudienceFiles", "FilesStore", "WaitingRun", "Watcher"]

log = logging.getLogger(__name__)

_PARTIAL_SUFFIXES = (".part", ".filepart", ".tmp", ".partial", ".crdownload")
_HASH_BLOCK = 1 << 20
_DAY_SECONDS = 86_400.0


class AudienceFiles(msgspec.Struct, frozen=True, kw_only=True):
    """What the watcher needs of one audience fed by files."""

    audience_id: str
    aep_audience_id: str
    file_mode: str = "full"
    file_columns: FileColumns = FileColumns()
    max_removal_percent: float = 20.0


class WaitingRun(msgspec.Struct, frozen=True, kw_only=True):
    """A run seen but not read yet, and why."""

    audience_id: str
    run_key: str
    files: tuple[str, ...]
    reason: str
    since: float


class FilesStore(Protocol):
    """The part of :class:`~dbsync.store.Store` the watcher uses."""

    async def apply_snapshot(
        self,
        audience_id: str,
        chunks: AsyncIterator[Sequence[Row]],
        *,
        source: str,
        mode: str = "full",
        max_removal_percent: float | None = 20.0,
        run: Callable[[], FileRunInfo] | None = None,
    ) -> SnapshotOutcome: ...

    async def file_run_decided(self, run: FileRunInfo) -> str | None: ...

    async def record_file_run(self, run: FileRunInfo, outcome: str, reason: str) -> None: ...

    async def file_runs(self, limit: int = 50) -> list[FileRun]: ...

    async def file_runs_to_clean(self, decided_before: float) -> list[FileRun]: ...

    async def mark_files_deleted(self, run_ids: Sequence[int]) -> None: ...


class _Seen(msgspec.Struct):
    """One file as the last polls saw it."""

    size: int
    mtime_ns: int
    still_since: float  # clock time at which (size, mtime) were first seen as they are


class _Run:
    def __init__(self, audience: AudienceFiles, run_key: str) -> None:
        self.audience = audience
        self.run_key = run_key
        self.parts: dict[int, Path] = {}
        self.run_time: float | None = None
        self.expected: dict[str, int | None] = {}  # from manifests: name -> size
        self.manifests: set[Path] = set()
        self.manifest_time: float | None = None


class Watcher:
    """Polls ``settings.directory`` and applies the AEP runs it finds; :meth:`run` it."""

    def __init__(
        self,
        store: FilesStore,
        settings: FileIngestSettings,
        audiences: Callable[[], Mapping[str, AudienceFiles]],
        clock: Clock,
    ) -> None:
        self._store = store
        self._settings = settings
        self._audiences = audiences  # by lower-case aep_audience_id, the config in force
        self._clock = clock
        self._stopping = asyncio.Event()
        self._seen: dict[Path, _Seen] = {}
        self._decided: set[tuple[Path, int, int]] = set()  # (path, size, mtime_ns)
        self._decided_names: set[str] = set()  # their names, as manifests list them
        self._unmatched: set[Path] = set()
        self._waiting: dict[tuple[str, str], WaitingRun] = {}
        self._manifests: dict[tuple[Path, int, int], dict[str, int | None] | None] = {}
        self._failing = ""
        self.polls = 0  # completed polls, for tests that wait for one

    @property
    def directory(self) -> Path:
        return self._settings.directory

    def waiting(self) -> list[WaitingRun]:
        """Runs seen and not read yet: parts missing, or still being written."""
        return sorted(self._waiting.values(), key=lambda w: (w.since, w.run_key))

    def stop(self) -> None:
        """Let :meth:`run` return after the poll under way."""
        self._stopping.set()

    async def run(self) -> None:
        try:
            # An SFTP chroot or a bucket mirror may not exist yet: make it (mode 0750).
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            self._failed(str(exc))  # and the polls say it again until it is fixed
        log.info(
            "files_watching",
            extra={
                "directory": str(self.directory),
                "audiences": sorted(a.audience_id for a in self._audiences().values()),
                "poll_seconds": self._settings.poll_seconds,
                "settle_seconds": self._settings.settle_seconds,
            },
        )
        while not self._stopping.is_set():
            await self.poll()
            stop = asyncio.ensure_future(self._stopping.wait())
            tick = asyncio.ensure_future(self._clock.sleep(self._settings.poll_seconds))
            try:
                await asyncio.wait({stop, tick}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                tick.cancel()

    async def poll(self) -> None:
        """One pass over the folder: apply what is complete, clean what is old."""
        try:
            runs = await asyncio.to_thread(self._scan)
        except OSError as exc:
            self._failed(str(exc))
            self.polls += 1
            return
        current = {(r.audience.audience_id, r.run_key) for r in runs}
        for gone in set(self._waiting) - current:
            del self._waiting[gone]  # its files were removed, or its audience deactivated
        for run in sorted(runs, key=lambda r: (r.audience.audience_id, _time(r), r.run_key)):
            if self._stopping.is_set():
                break
            # A file that cannot be read now, or a store that cannot commit (a full disk):
            # nothing of the run was applied, and the next poll tries it again. Neither
            # may end the daemon.
            try:
                await self._consider(run)
            except (OSError, StoreError) as exc:
                self._failed(f"{run.run_key}: {exc}")
        try:
            await self._clean()
        except (OSError, StoreError) as exc:
            self._failed(str(exc))
        self.polls += 1

    def _failed(self, error: str) -> None:
        if error != self._failing:
            log.error(
                "files_watch_failed", extra={"directory": str(self.directory), "error": error}
            )
        self._failing = error

    # --- listing -------------------------------------------------------------------------

    def _scan(self) -> list[_Run]:
        """The runs in the folder now (on a worker thread: it stats every file)."""
        audiences = self._audiences()
        now = self._clock.time()
        runs: dict[tuple[str, str], _Run] = {}
        present: dict[str, Path] = {}
        manifests: list[Path] = []
        seen: dict[Path, _Seen] = {}
        for path, stat in self._files():
            key = (path, stat.st_size, stat.st_mtime_ns)
            if key in self._decided:
                continue
            if is_manifest(path.name):
                manifests.append(path)
                continue
            relative = path.relative_to(self.directory)
            parsed = parse_name(relative, audiences.keys())
            if parsed is None:
                if path not in self._unmatched:
                    self._unmatched.add(path)
                    log.info("files_unmatched", extra={"file": str(relative)})
                continue
            before = self._seen.get(path)
            still = (
                before.still_since
                if before and (before.size, before.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
                else now
            )
            seen[path] = _Seen(size=stat.st_size, mtime_ns=stat.st_mtime_ns, still_since=still)
            present[path.name] = path
            run = self._run(runs, audiences[parsed.aep_audience_id], parsed)
            run.parts[parsed.part] = path
        self._seen = seen
        for path in manifests:
            listed = self._manifest(path)
            if listed is None:
                continue
            for name, size in listed.items():
                if name in self._decided_names:
                    continue
                where = present.get(name, path.parent / name).relative_to(self.directory)
                parsed = parse_name(where, audiences.keys())
                if parsed is None:
                    continue
                run = self._run(runs, audiences[parsed.aep_audience_id], parsed)
                run.expected[name] = size
                run.manifests.add(path)
        return list(runs.values())

    def _files(self) -> list[tuple[Path, os.stat_result]]:
        found = []
        for root, folders, names in os.walk(self.directory):
            folders[:] = [f for f in folders if not f.startswith(".")]
            for name in names:
                if name.startswith(".") or name.lower().endswith(_PARTIAL_SUFFIXES):
                    continue
                path = Path(root, name)
                try:
                    found.append((path, path.stat()))
                except FileNotFoundError:
                    continue  # gone between the listing and the stat
        return found

    @staticmethod
    def _run(runs: dict[tuple[str, str], _Run], audience: AudienceFiles, name: FileName) -> _Run:
        key = (audience.audience_id, name.run_key)
        if (run := runs.get(key)) is None:
            run = runs[key] = _Run(audience, name.run_key)
        if name.run_time is not None:
            run.run_time = name.run_time
        return run

    def _manifest(self, path: Path) -> dict[str, int | None] | None:
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._manifests:
            try:
                manifest = parse_manifest(path.read_bytes())
                self._manifests[key] = {p.name: p.size for p in manifest.export_results}
            except ManifestError:
                self._manifests[key] = None  # perhaps still being written: next poll
        return self._manifests[key]

    # --- deciding ------------------------------------------------------------------------

    def _readiness(self, run: _Run) -> str:
        """Why ``run`` cannot be read yet, or ""."""
        if run.expected:
            present = {path.name: path for path in run.parts.values()}
            for name, size in sorted(run.expected.items()):
                path = present.get(name)
                if path is None:
                    return f"part {name} is missing (listed in the manifest)"
                actual = self._seen[path].size
                if size is not None and actual != size:
                    return f"part {name} is {actual} bytes; the manifest says {size}"
            return ""
        if not run.parts:
            return "no part yet"
        now = self._clock.time()
        for path in run.parts.values():
            still = now - self._seen[path].still_since
            if still < self._settings.settle_seconds:
                return f"{path.name} changed {still:.0f} s ago; read once still for" + (
                    f" {self._settings.settle_seconds:g} s"
                )
        return ""

    async def _consider(self, run: _Run) -> None:
        audience_id = run.audience.audience_id
        reason = self._readiness(run)
        key = (audience_id, run.run_key)
        if reason:
            files = tuple(sorted({p.name for p in run.parts.values()} | set(run.expected)))
            previous = self._waiting.get(key)
            # Once per reason, and only a manifest's gap: a file settling is normal.
            if run.expected and (previous is None or previous.reason != reason):
                log.info(
                    "files_run_waiting",
                    extra={"audience": audience_id, "run": run.run_key, "reason": reason},
                )
            since = previous.since if previous else self._clock.time()
            self._waiting[key] = WaitingRun(
                audience_id=audience_id,
                run_key=run.run_key,
                files=files,
                reason=reason,
                since=since,
            )
            return
        self._waiting.pop(key, None)
        parts = [run.parts[n] for n in sorted(run.parts)]
        stats = [(p, self._seen[p].size, self._seen[p].mtime_ns) for p in parts]
        digest = await asyncio.to_thread(_hash, parts)
        run_time = run.run_time
        if run_time is None:
            run_time = next(
                (t for m in run.manifests if (t := _manifest_time(m)) is not None), None
            ) or max(mtime / 1e9 for _, _, mtime in stats)
        names = tuple(str(p.relative_to(self.directory)) for p in parts) + tuple(
            str(m.relative_to(self.directory)) for m in sorted(run.manifests)
        )
        info = FileRunInfo(
            audience_id=audience_id,
            run_key=run.run_key,
            run_time=run_time,
            content_hash=digest,
            files=names,
        )
        decided = await self._store.file_run_decided(info)
        if decided == "seen":
            self._done(stats)
            return
        if decided is not None:
            why = (
                "older than the newest applied run of the audience"
                if decided == "skipped_late"
                else "the same content was applied under another name"
            )
            await self._store.record_file_run(info, decided, why)
            log.info(
                "files_run_skipped",
                extra={
                    "audience": audience_id,
                    "run": run.run_key,
                    "outcome": decided,
                    "reason": why,
                },
            )
            self._done(stats)
            return
        await self._apply(run, parts, info)
        self._done(stats)

    def _done(self, stats: list[tuple[Path, int, int]]) -> None:
        self._decided.update(stats)
        self._decided_names.update(path.name for path, _, _ in stats)

    async def _apply(self, run: _Run, parts: list[Path], info: FileRunInfo) -> None:
        audience = run.audience
        counts = ReadCounts()
        try:
            outcome = await self._store.apply_snapshot(
                audience.audience_id,
                _chunks(parts, audience, counts),
                source="files",
                mode=audience.file_mode,
                max_removal_percent=audience.max_removal_percent,
                run=lambda: msgspec.structs.replace(info, invalid=counts.invalid),
            )
        except FileRefused as exc:
            await self._store.record_file_run(info, "refused", str(exc))
            log.warning(
                "files_run_refused",
                extra={
                    "audience": audience.audience_id,
                    "run": run.run_key,
                    "files": list(info.files),
                    "reason": str(exc),
                },
            )
            return
        if counts.invalid:
            log.warning(
                "files_rows_invalid",
                extra={
                    "audience": audience.audience_id,
                    "run": run.run_key,
                    "invalid": counts.invalid,
                    "examples": counts.examples,
                },
            )
        if outcome.state == "held":
            log.warning(
                "snapshot_held",
                extra={
                    "audience": audience.audience_id,
                    "source": "files",
                    "run": run.run_key,
                    "members": outcome.members,
                    "removed": outcome.removed,
                    "reason": outcome.reason,
                },
            )
            return
        log.info(
            "files_run_applied",
            extra={
                "audience": audience.audience_id,
                "run": run.run_key,
                "files": list(info.files),
                "mode": outcome.mode,
                "rows": outcome.rows,
                "members": outcome.members,
                "exited": outcome.exited,
                "added": outcome.added,
                "removed": outcome.removed,
                "duplicates": outcome.duplicates,
                "conflicts": outcome.conflicts,
                "invalid": counts.invalid,
            },
        )

    # --- cleaning ------------------------------------------------------------------------

    async def _clean(self) -> None:
        cutoff = self._clock.time() - self._settings.keep_days * _DAY_SECONDS
        old = await self._store.file_runs_to_clean(cutoff)
        if not old:
            return
        # A static name is reused by every export: a newer run's file is not the old one's.
        newer = {
            name
            for r in await self._store.file_runs(limit=1000)
            if r.decided_at >= cutoff and not r.files_deleted
            for name in r.files
        }
        for run in old:
            deleted = []
            for name in run.files:
                if name in newer:
                    continue
                path = self.directory / name
                try:
                    path.unlink()
                    deleted.append(name)
                except FileNotFoundError:
                    continue
            log.info(
                "files_deleted",
                extra={"audience": run.audience_id, "run": run.run_key, "files": deleted},
            )
        await self._store.mark_files_deleted([r.run_id for r in old])


def _time(run: _Run) -> float:
    return run.run_time if run.run_time is not None else float("inf")


def _manifest_time(path: Path) -> float | None:
    try:
        return parse_manifest(path.read_bytes()).scheduled_epoch
    except (OSError, ManifestError):
        return None


def _hash(parts: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in parts:
        with path.open("rb") as file:
            while block := file.read(_HASH_BLOCK):
                digest.update(block)
        digest.update(b"\0part\0")
    return digest.hexdigest()


async def _chunks(
    parts: list[Path], audience: AudienceFiles, counts: ReadCounts
) -> AsyncIterator[Sequence[Row]]:
    """The run's rows, read on a worker thread a chunk at a time (the loop stays free)."""
    for path in parts:
        rows = read_file(path, audience.file_columns, mode=audience.file_mode, counts=counts)
        # An OSError (a file gone, no permission) is not the file's fault: it propagates,
        # the poll reports it, and the run is tried again at the next one.
        try:
            while (chunk := await asyncio.to_thread(next, rows, None)) is not None:
                yield chunk
        finally:
            rows.close()
