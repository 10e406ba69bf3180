"""AEP's optional manifest: ``manifest-<destinationId>-<dataflowRunId>.json``.

Adobe's sample::

    {"flowRunId": "0ac8f3c0-...", "scheduledTime": "2023-08-18T01:00:00Z",
     "exportResults": [{"sinkPath": "/destination/output001",
                        "name": "amazon-s3_segment-name_20230818_010718.json",
                        "size": 145854}]}

A run listed in a manifest is read once every part it lists is present at its size:
the manifest, written after the files, is the one reliable "done" signal.
Unknown fields are tolerated (it is Adobe's document, not ours).
"""

from __future__ import annotations

import datetime as dt

import msgspec

__all__ = ["Manifest", "ManifestError", "ManifestPart", "parse_manifest"]


class ManifestError(ValueError):
    """Not a manifest this module can read."""


class ManifestPart(msgspec.Struct, frozen=True, rename="camel"):
    name: str
    size: int | None = None
    sink_path: str = ""


class Manifest(msgspec.Struct, frozen=True, rename="camel"):
    export_results: tuple[ManifestPart, ...]
    flow_run_id: str = ""
    scheduled_time: str = ""

    @property
    def scheduled_epoch(self) -> float | None:
        """``scheduledTime`` in seconds since the epoch; None if absent or unreadable."""
        try:
            moment = dt.datetime.fromisoformat(self.scheduled_time.replace("Z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.timestamp()


_decode = msgspec.json.Decoder(Manifest).decode


def parse_manifest(data: bytes) -> Manifest:
    try:
        return _decode(data)
    except msgspec.DecodeError as exc:
        raise ManifestError(f"not an AEP manifest: {exc}") from None
