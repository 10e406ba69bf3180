"""The probe's result, kept per destination in ``<state_dir>/contract.json``.

``dbsync probe`` runs as its own process, beside a daemon that may be running and owns
the SQLite store; so the result is a small JSON file that the probe replaces whole
(written to a temporary file, then renamed) and that ``dbsync ctl status`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import msgspec

__all__ = [
    "CONTRACT_FILE",
    "ContractRecord",
    "Verdict",
    "a5_holds",
    "contract_path",
    "read_records",
    "write_record",
]

CONTRACT_FILE: Final = "contract.json"


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What the probe found of one assumption, and what dbsync does about it."""

    check: str  # A1 .. A5, auth, states, job_answers, refused_rows, results_url
    outcome: str  # holds | differs | could not tell
    finding: str  # what was seen
    action: str  # what dbsync does as a result
    dialect: str = ""  # the emulator dialect that reads Demandbase this way, if any


class ContractRecord(msgspec.Struct, frozen=True, kw_only=True):
    destination: str
    probed_at: float  # epoch seconds
    state: str  # holds | degraded | broken | incomplete
    list_name: str
    verdicts: list[Verdict]
    spent: dict[str, int]


_decoder = msgspec.json.Decoder(dict[str, ContractRecord])
_encoder = msgspec.json.Encoder()


def contract_path(state_dir: Path) -> Path:
    return state_dir / CONTRACT_FILE


def read_records(state_dir: Path) -> dict[str, ContractRecord]:
    """Each destination's last probe; {} when none ran, or the file is unreadable."""
    try:
        return _decoder.decode(contract_path(state_dir).read_bytes())
    except (OSError, msgspec.DecodeError):
        return {}


def write_record(state_dir: Path, record: ContractRecord) -> Path:
    """Keep ``record`` beside the other destinations' records; the file's path."""
    records = read_records(state_dir)
    records[record.destination] = record
    path = contract_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(msgspec.json.format(_encoder.encode(records)) + b"\n")
    os.replace(temporary, path)
    return path


def a5_holds(state_dir: Path, destination: str) -> bool:
    """Whether the destination's last probe found that a multi-list export says each
    row's list (A5); False when no probe ran or its record is unreadable."""
    record = read_records(state_dir).get(destination)
    if record is None:
        return False
    return any(v.check == "A5" and v.outcome == "holds" for v in record.verdicts)
