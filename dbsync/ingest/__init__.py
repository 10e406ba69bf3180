"""Ingest: the HTTP server through which desired state arrives.

``server`` holds the routes and their gates, ``bodies`` decodes native changes and
snapshots (NDJSON, JSON, CSV) with rejections that name the field, and ``aep`` maps
Adobe Experience Platform profile exports to changes.
"""

from dbsync.ingest.aep import AepMapping
from dbsync.ingest.server import ChangeStore, IngestServer, IngestStats, SnapshotCounts

__all__ = ["AepMapping", "ChangeStore", "IngestServer", "IngestStats", "SnapshotCounts"]
