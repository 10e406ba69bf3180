"""AEP export file names: each documented template, split parts, folders, manifests."""

from __future__ import annotations

import calendar
from pathlib import PurePath

import pytest

from dbsync.files.manifest import ManifestError, parse_manifest
from dbsync.files.names import is_manifest, parse_name

AUDIENCE = "7c1f0d3a-2b4e-4c6f-9a8b-1d2e3f4a5b6c"
FLOW = "0ac8f3c0-1111-4222-8333-944455556666"
T = float(calendar.timegm((2026, 12, 3, 1, 7, 18, 0, 0, 0)))


@pytest.mark.parametrize(
    ("name", "run_key", "part", "run_time"),
    [
        # %DESTINATION_NAME%_%SEGMENT_ID%_%DATETIME(YYYYMMdd_HHmmss)%
        (
            f"amazon-s3_{AUDIENCE}_20261203_010718.csv",
            f"amazon-s3_{AUDIENCE}_20261203_010718",
            1,
            T,
        ),
        (
            f"amazon-s3_{AUDIENCE}_20261203_010718_2.csv",
            f"amazon-s3_{AUDIENCE}_20261203_010718",
            2,
            T,
        ),
        (
            f"amazon-s3_{AUDIENCE}_20261203_010718_12.csv.gz",
            f"amazon-s3_{AUDIENCE}_20261203_010718",
            12,
            T,
        ),
        # with the audience name, a Unix timestamp and custom text
        (
            f"SFTP_{AUDIENCE}_High intent EMEA_{int(T)}_daily-full.csv",
            f"SFTP_{AUDIENCE}_High intent EMEA_{int(T)}_daily-full",
            1,
            T,
        ),
        (
            f"SFTP_{AUDIENCE}_High intent EMEA_{int(T)}_daily-full_3.json",
            f"SFTP_{AUDIENCE}_High intent EMEA_{int(T)}_daily-full",
            3,
            T,
        ),
        # the older form: segment<uuid>_<yyyymmddhhmmss>, upper case
        (
            f"Salesforce_Marketing_Cloud_segment{AUDIENCE.upper()}_20261203010718.csv",
            f"Salesforce_Marketing_Cloud_segment{AUDIENCE.upper()}_20261203010718",
            1,
            T,
        ),
        # a dataflow id after the audience's
        (
            f"dlz_{AUDIENCE}_{FLOW}_20261203_010718.parquet",
            f"dlz_{AUDIENCE}_{FLOW}_20261203_010718",
            1,
            T,
        ),
        # static: no date-time, each export overwrites the last
        (f"azure-blob_{AUDIENCE}.csv", f"azure-blob_{AUDIENCE}", 1, None),
        (f"azure-blob_{AUDIENCE}_2.csv", f"azure-blob_{AUDIENCE}", 2, None),
    ],
)
def test_documented_templates(name: str, run_key: str, part: int, run_time: float | None) -> None:
    parsed = parse_name(PurePath("inbox", name), [AUDIENCE])
    assert parsed is not None
    assert (parsed.aep_audience_id, parsed.run_key, parsed.part, parsed.run_time) == (
        AUDIENCE,
        run_key,
        part,
        run_time,
    )


def test_the_audience_can_be_the_folder() -> None:
    parsed = parse_name(PurePath("inbox", AUDIENCE, "export_20261203_010718.csv"), [AUDIENCE])
    assert parsed is not None
    assert (parsed.aep_audience_id, parsed.run_time) == (AUDIENCE, T)


def test_the_configured_uuid_is_taken_not_the_first() -> None:
    parsed = parse_name(PurePath(f"x_{FLOW}_{AUDIENCE}_20261203_010718.csv"), [AUDIENCE])
    assert parsed is not None
    assert parsed.aep_audience_id == AUDIENCE


def test_files_of_other_audiences_are_not_ours() -> None:
    assert parse_name(PurePath(f"x_{FLOW}_20261203_010718.csv"), [AUDIENCE]) is None


def test_manifests_are_recognised_and_read() -> None:
    name = f"manifest-d0420d72-aaaa-4bbb-8ccc-dddddddddddd-{FLOW}.json"
    assert is_manifest(name)
    assert not is_manifest(f"amazon-s3_{AUDIENCE}_20261203_010718.json")
    manifest = parse_manifest(
        b'{"flowRunId":"' + FLOW.encode() + b'","scheduledTime":"2026-12-03T01:07:18Z",'
        b'"exportResults":[{"sinkPath":"/out","name":"a.csv","size":145854},'
        b'{"sinkPath":"/out","name":"a_2.csv","size":10}],"extra":1}'
    )
    assert [(p.name, p.size) for p in manifest.export_results] == [
        ("a.csv", 145854),
        ("a_2.csv", 10),
    ]
    assert manifest.scheduled_epoch == T
    with pytest.raises(ManifestError):
        parse_manifest(b'{"flowRunId": 1}')
