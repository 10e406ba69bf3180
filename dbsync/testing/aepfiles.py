"""Writes account-audience files the way AEP's cloud-storage destinations do.

For tests, benchmarks and ``dbsync demo``: the documented name templates, split parts
(``name.csv``, ``name_2.csv``) and the optional manifest, CSV with each option Adobe
offers (delimiter, quote, escape, null output, UTF-8 or UTF-16, gzip; written as Spark
writes it: a value is quoted only when it must be, a quote inside escaped), JSON Lines
and Parquet (with pyarrow). Rows are written to a temporary name and renamed, as a sync
tool or an SFTP client that uploads then renames would, unless ``slowly`` asks for the
bytes to appear a piece at a time.
"""

from __future__ import annotations

import calendar
import gzip
import io
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

__all__ = ["ADOBE_HEADERS", "ExportRow", "epoch", "export_name", "write_export", "write_manifest"]

# One account of an export: (external_id, name, domain, status or None).
ExportRow = tuple[str, str, str, str | None]

# Adobe's default headers (mapped attributes, dots as underscores).
ADOBE_HEADERS = ("accountKey_sourceKey", "accountName", "accountOrganization_domain", "status")


def export_name(
    aep_audience_id: str,
    when: float | None,
    *,
    destination: str = "amazon-s3",
    template: Literal["datetime", "timestamp", "legacy", "static"] = "datetime",
    audience_name: str = "",
    custom_text: str = "",
) -> str:
    """A run's name without its extension, after the documented templates."""
    parts = [destination]
    parts.append(f"segment{aep_audience_id}" if template == "legacy" else aep_audience_id)
    if audience_name:
        parts.append(audience_name)
    if when is not None and template != "static":
        moment = time.gmtime(when)
        if template == "timestamp":
            parts.append(str(int(when)))
        elif template == "legacy":
            parts.append(time.strftime("%Y%m%d%H%M%S", moment))
        else:
            parts.append(time.strftime("%Y%m%d_%H%M%S", moment))
    if custom_text:
        parts.append(custom_text)
    return "_".join(parts)


def _cell(value: str | None, delimiter: str, quote: str, escape: str, null: str) -> str:
    if value is None:
        return null
    if not quote:
        return value
    if value == "":
        return '""' if null != '""' else ""
    if any(c in value for c in (delimiter, quote, "\n", "\r")) or value != value.strip():
        return quote + value.replace(quote, escape + quote) + quote
    return value


def _csv_lines(
    rows: Iterable[ExportRow],
    headers: Sequence[str],
    *,
    delimiter: str,
    quote: str,
    escape: str,
    null: str,
    newline: str,
) -> Iterator[str]:
    yield delimiter.join(headers) + newline
    width = len(headers)
    for row in rows:
        cells = [_cell(v, delimiter, quote, escape, null) for v in row[:width]]
        yield delimiter.join(cells) + newline


def write_export(
    directory: Path,
    aep_audience_id: str,
    rows: Iterable[ExportRow],
    *,
    when: float | None,
    file_format: Literal["csv", "json", "parquet"] = "csv",
    template: Literal["datetime", "timestamp", "legacy", "static"] = "datetime",
    audience_name: str = "",
    custom_text: str = "",
    headers: Sequence[str] = ADOBE_HEADERS,
    delimiter: str = ",",
    quote: str = '"',
    escape: str = "\\",
    null: str = "",
    encoding: str = "utf-8",
    newline: str = "\n",
    compress: bool = False,
    max_rows_per_file: int = 5_000_000,
    manifest: bool = False,
    scheduled_time: float | None = None,
) -> list[Path]:
    """Write one run (its parts, then its manifest if asked); the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = export_name(
        aep_audience_id,
        when,
        template=template,
        audience_name=audience_name,
        custom_text=custom_text,
    )
    extension = {"csv": ".csv", "json": ".json", "parquet": ".parquet"}[file_format]
    if compress:
        extension += ".gz"
    paths: list[Path] = []
    iterator = iter(rows)
    part = 1
    while True:
        chunk = [row for _, row in zip(range(max_rows_per_file), iterator, strict=False)]
        if not chunk and part > 1:
            break
        name = stem + ("" if part == 1 else f"_{part}") + extension
        data = _encode_part(
            chunk,
            file_format,
            headers=headers,
            delimiter=delimiter,
            quote=quote,
            escape=escape,
            null=null,
            encoding=encoding,
            newline=newline,
        )
        if compress:
            data = gzip.compress(data, compresslevel=1)
        path = directory / name
        temporary = directory / f".{name}.part"
        temporary.write_bytes(data)
        os.replace(temporary, path)
        paths.append(path)
        part += 1
        if len(chunk) < max_rows_per_file:
            break
    if manifest:
        flow_run_id = str(uuid.uuid5(uuid.NAMESPACE_URL, stem))  # one per run, as AEP's
        paths.append(
            write_manifest(
                directory, paths, scheduled_time=scheduled_time or when, flow_run_id=flow_run_id
            )
        )
    return paths


def _encode_part(
    rows: list[ExportRow],
    file_format: str,
    *,
    headers: Sequence[str],
    delimiter: str,
    quote: str,
    escape: str,
    null: str,
    encoding: str,
    newline: str,
) -> bytes:
    if file_format == "csv":
        text = "".join(
            _csv_lines(
                rows,
                headers,
                delimiter=delimiter,
                quote=quote,
                escape=escape,
                null=null,
                newline=newline,
            )
        )
        return text.encode(encoding)
    if file_format == "json":
        encode = msgspec.json.encode
        return b"".join(encode(dict(zip(headers, row, strict=False))) + b"\n" for row in rows)
    import pyarrow as pa  # type: ignore[import-not-found, import-untyped, unused-ignore]
    import pyarrow.parquet as pq  # type: ignore[import-not-found, import-untyped, unused-ignore]

    columns: dict[str, Any] = {
        h: [row[i] if i < len(row) else None for row in rows] for i, h in enumerate(headers)
    }
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def write_manifest(
    directory: Path,
    parts: Sequence[Path],
    *,
    scheduled_time: float | None,
    destination_id: str = "d0420d72-1111-4222-8333-444455556666",
    flow_run_id: str = "0ac8f3c0-aaaa-4bbb-8ccc-ddddeeeeffff",
    sizes: dict[str, int] | None = None,
) -> Path:
    """The manifest of a run: each part's name and size (``sizes`` overrides some)."""
    moment = time.gmtime(scheduled_time or 0)
    document = {
        "flowRunId": flow_run_id,
        "scheduledTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", moment),
        "exportResults": [
            {
                "sinkPath": "/destination/output",
                "name": part.name,
                "size": (sizes or {}).get(part.name, part.stat().st_size),
            }
            for part in parts
        ],
    }
    path = directory / f"manifest-{destination_id}-{flow_run_id}.json"
    path.write_bytes(msgspec.json.encode(document))
    return path


def epoch(year: int, month: int, day: int, hour: int = 1, minute: int = 0) -> float:
    """A UTC date-time in seconds since the epoch (export times in tests)."""
    return float(calendar.timegm((year, month, day, hour, minute, 0, 0, 0, 0)))
