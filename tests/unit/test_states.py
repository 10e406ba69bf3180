"""The state machines: each allows the moves its diagram draws, and no other."""

from __future__ import annotations

import ast
import enum
import itertools
from pathlib import Path

import pytest

from dbsync import model, states
from dbsync.states import (
    TRANSITIONS,
    AudienceState,
    BatchState,
    DestinationState,
    ExportJobState,
    IllegalTransition,
    ImportJobState,
    ReconcileRunState,
    check_transition,
)


def test_states_imports_nothing_of_dbsync() -> None:
    tree = ast.parse(Path(states.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [name for name in imported if name and name.startswith("dbsync")]


def test_model_reexports_the_states_it_used_to_define() -> None:
    assert model.AudienceState is AudienceState
    assert model.BatchState is BatchState


@pytest.mark.parametrize("machine", list(TRANSITIONS))
def test_every_state_has_a_row_and_every_edge_stays_in_its_machine(
    machine: type[enum.StrEnum],
) -> None:
    table = TRANSITIONS[machine]
    assert set(table) == set(machine)
    for targets in table.values():
        assert all(type(target) is machine for target in targets)


def test_audience() -> None:
    A = AudienceState
    assert check_transition(A.ACTIVE, A.PAUSED) is A.PAUSED
    assert check_transition(A.FAILED, A.ACTIVE) is A.ACTIVE  # a call went through again
    assert check_transition(A.STOPPED, A.FAILED) is A.FAILED  # restart budget spent
    assert check_transition(A.PAUSED, A.DEACTIVATED) is A.DEACTIVATED
    assert check_transition(A.DEACTIVATED, A.ACTIVE) is A.ACTIVE  # reactivated
    with pytest.raises(IllegalTransition, match="deactivated -> failed"):
        check_transition(A.DEACTIVATED, A.FAILED)


def test_batch() -> None:
    B = BatchState
    path = [B.PLANNED, B.CREATED, B.UPLOADED, B.COMPLETED]
    for current, new in itertools.pairwise(path):
        assert check_transition(current, new) is new
    assert check_transition(B.CREATED, B.ABANDONED) is B.ABANDONED
    with pytest.raises(IllegalTransition):
        check_transition(B.PLANNED, B.UPLOADED)  # an upload needs a job
    for final in (B.COMPLETED, B.FAILED, B.ABANDONED):
        assert not final.is_open
        with pytest.raises(IllegalTransition):
            check_transition(final, B.PLANNED)


def test_destination() -> None:
    D = DestinationState
    assert check_transition(D.RUNNING, D.AUTH_FAILED) is D.AUTH_FAILED
    assert check_transition(D.PERMISSION_DENIED, D.RUNNING) is D.RUNNING
    # A stop is cured by running again, never by trading one reason for another.
    with pytest.raises(IllegalTransition):
        check_transition(D.AUTH_FAILED, D.PERMISSION_DENIED)


def test_import_job() -> None:
    J = ImportJobState
    assert check_transition(J.NEW, J.PROCESSING) is J.PROCESSING
    assert check_transition(J.PROCESSING, J.COMPLETED) is J.COMPLETED
    with pytest.raises(IllegalTransition):
        check_transition(J.COMPLETED, J.PROCESSING)
    assert J("completed") == "completed"  # compares with the wire's bare strings


def test_export_job() -> None:
    E = ExportJobState
    assert check_transition(E.ACCEPTED, E.FINISHED) is E.FINISHED
    with pytest.raises(IllegalTransition):
        check_transition(E.FAILED, E.FINISHED)


def test_reconcile_run() -> None:
    R = ReconcileRunState
    assert check_transition(R.EXPORTING, R.APPLIED) is R.APPLIED
    assert check_transition(R.APPLIED, R.COMPLETED) is R.COMPLETED
    with pytest.raises(IllegalTransition):
        check_transition(R.APPLIED, R.FAILED)  # its repairs are committed already
    with pytest.raises(IllegalTransition):
        check_transition(R.EXPORTING, R.COMPLETED)


def test_staying_put_is_allowed_and_machines_do_not_mix() -> None:
    assert check_transition(BatchState.COMPLETED, BatchState.COMPLETED) is BatchState.COMPLETED
    with pytest.raises(IllegalTransition, match=r"ImportJobState\.COMPLETED"):
        check_transition(BatchState.UPLOADED, ImportJobState.COMPLETED)
