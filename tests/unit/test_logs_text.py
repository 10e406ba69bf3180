"""The text log format, ``dbsync ctl`` and ``dbsync demo`` show values, never Python reprs."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from dbsync.logs import TextFormatter, text_value
from dbsync.model import Account, AudienceState, LedgerCounts, LossCause, RejectReason
from dbsync.states import DestinationState

REPRS = ("<", "{'", '{"', "Enum.", "LossCause", "AudienceState", "Account(")


@pytest.fixture
def text_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("dbsync.test_logs_text")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_enums_mappings_lists_and_structs_render_as_values(
    text_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = text_log
    logger.warning(
        "loss_detected",
        extra={
            "audience": "a-1",
            "state": AudienceState.FAILED,
            "reason": DestinationState.AUTH_FAILED,
            "lost": {LossCause.DROPPED: 5, LossCause.NOT_REMOVED: 2},
            "in_flight": ["a", "b"],
            "accounts": [{"external_id": "X1", "domain": "x.example"}],
            "account": Account(external_id="X2", name="X Co", domain="x2.example"),
            "ledger": LedgerCounts(
                received=7,
                lost_by_cause={LossCause.DROPPED: 5},
                rejected_by_reason={RejectReason.UNMATCHED: 1},
            ),
            "empty": {},
            "none": None,
        },
    )
    line = stream.getvalue()
    assert not [r for r in REPRS if r in line], line
    assert " audience=a-1 " in line
    assert " state=failed " in line
    assert " reason=auth_failed " in line
    assert " lost=dropped:5,not_removed:2 " in line
    assert " in_flight=a,b " in line
    assert " accounts={external_id:X1,domain:x.example} " in line
    assert " account=external_id:X2,name:X Co,domain:x2.example" in line
    assert "lost_by_cause:{dropped:5}" in line
    assert "rejected_by_reason:{unmatched:1}" in line
    assert " empty={} " in line


def test_text_value_brackets_what_is_nested() -> None:
    assert text_value({"a": [1, 2], "b": {"c": LossCause.VANISHED}}) == "a:[1,2],b:{c:vanished}"
    assert text_value([[1], []]) == "[1],[]"
    assert text_value(frozenset({"b", "a"})) == "a,b"
    assert text_value(b"\x00\x01") == "2 bytes"
    assert text_value(3.5) == "3.5"


def test_ctl_shows_an_imbalance_and_a_reason_as_text() -> None:
    from dbsync.admin.cells import cell as _cell
    from dbsync.admin.cells import safe as _safe

    assert _cell({"delivery": 1}) == "delivery:1"
    assert _cell(LossCause.DROPPED) == "dropped"
    # A reason quoting an exception stays on one line, without control characters.
    assert _safe("RuntimeError('boom\\n')\n\x1b[31mred") == "RuntimeError('boom\\n') [31mred"
