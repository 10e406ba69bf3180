"""AEP export file names: which audience, which run, which part.

Adobe documents the template ``%DESTINATION_NAME%_%SEGMENT_ID%_%DATETIME(YYYYMMdd_HHmmss)%``
with optional parts in a fixed order (audience name, a 10-digit Unix timestamp instead
of the date-time, custom text at the end, dataflow id or name, org, sandbox), an older
``<destination>_segment<uuid>_<yyyymmddhhmmss>`` form, and split parts ``name.csv``,
``name_2.csv``, ``name_3.csv``. The destination-name prefix varies (``amazon-s3_``,
``Salesforce_Marketing_Cloud_``), so nothing is anchored on it: the audience is the
first configured UUID found in the name (else in a parent folder's name, for the
``/%SEGMENT_ID%`` folder macro), the run's time the first date-time token after it, and
the part the ``_N`` right before the extensions. A name without a date-time is static
(each export overwrites the last): its run time comes from the manifest or the file.

The run key is the name without its part suffix and extensions: the parts of one run
share it, and nothing else does.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Collection
from pathlib import PurePath

import msgspec

__all__ = ["FileName", "is_manifest", "parse_name"]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
# YYYYMMdd_HHmmss | legacy yyyymmddhhmmss | a Unix timestamp (10 digits), not inside a
# longer run of digits.
_DATETIME = re.compile(r"(?<![0-9])(\d{8}_\d{6}|\d{14}|\d{10})(?![0-9])")
_EXTENSIONS = re.compile(r"(\.(csv|json|jsonl|ndjson|parquet|txt|gz|gzip|pgp|gpg))+$", re.I)
# The split suffix: up to 4 digits' worth of parts, so a 6-digit time never matches.
_PART = re.compile(r"_(\d{1,4})$")
_MANIFEST = re.compile(r"^manifest-.+\.json$", re.I)


class FileName(msgspec.Struct, frozen=True, kw_only=True):
    """What a data file's name (and folder) says."""

    aep_audience_id: str  # lower case
    run_key: str
    part: int  # 1 for the first part (no suffix)
    run_time: float | None  # seconds since the epoch, UTC; None for a static name


def is_manifest(name: str) -> bool:
    return bool(_MANIFEST.match(name))


def parse_name(path: PurePath, aep_audience_ids: Collection[str]) -> FileName | None:
    """The audience, run and part of the file at ``path``; None if no configured
    audience's UUID is in its name or its folders' names (ids compared in lower case)."""
    stem = _EXTENSIONS.sub("", path.name)
    wanted = {i.lower() for i in aep_audience_ids}
    audience, after = None, 0
    for match in _UUID.finditer(stem):
        if match.group(0).lower() in wanted:
            audience, after = match.group(0).lower(), match.end()
            break
    if audience is None:
        for folder in reversed(path.parent.parts):
            if folder.lower() in wanted:
                audience = folder.lower()
                break
    if audience is None:
        return None
    part = 1
    if (suffix := _PART.search(stem)) is not None and suffix.start() >= after:
        part = int(suffix.group(1))
        stem = stem[: suffix.start()]
    run_time = None
    if (token := _DATETIME.search(stem, after)) is not None:
        run_time = _epoch(token.group(1))
    return FileName(aep_audience_id=audience, run_key=stem, part=part, run_time=run_time)


def _epoch(token: str) -> float | None:
    if len(token) == 10:
        return float(token)
    digits = token.replace("_", "")
    year, month, day = int(digits[0:4]), int(digits[4:6]), int(digits[6:8])
    hour, minute, second = int(digits[8:10]), int(digits[10:12]), int(digits[12:14])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))
