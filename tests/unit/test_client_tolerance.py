"""The client reads what Demandbase's definitions allow, not only what the emulator sends.

The definitions require no field of an import job, may leave ``resultsUrl`` null while
an export runs, and say nothing of the results file's column order, case or extras.
"""

from __future__ import annotations

import msgspec
import pytest

from dbsync.demandbase import wire
from dbsync.demandbase.csvfile import read_results
from dbsync.states import ExportJobState, ImportJobState, export_job_state, import_job_state


def test_an_import_job_with_only_its_id_and_state_decodes() -> None:
    job = msgspec.json.decode(b'{"id": 7, "state": "completed"}', type=wire.ImportJob)
    assert (job.id, job.state, job.updated_at, job.account_list_id) == (7, "completed", None, None)


def test_an_import_job_with_nulls_decodes() -> None:
    body = b'{"id": 7, "state": "new", "updatedAt": null, "dataImportName": null}'
    job = msgspec.json.decode(body, type=wire.ImportJob)
    assert job.updated_at is None
    assert job.data_import_name is None


def test_an_import_job_without_a_state_is_in_an_unknown_state() -> None:
    job = msgspec.json.decode(b'{"id": 7}', type=wire.ImportJob)
    assert import_job_state(job.state) is None


def test_a_null_results_url_while_an_export_runs_decodes() -> None:
    body = b'{"jobId": "j", "jobStatus": "processing", "resultsUrl": null}'
    status = msgspec.json.decode(body, type=wire.ExportJobStatus)
    assert status.results_url is None


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("completed", ImportJobState.COMPLETED),
        ("COMPLETED", ImportJobState.COMPLETED),
        (" Failed ", ImportJobState.FAILED),
        ("queued", None),
        ("", None),
        (None, None),
    ],
)
def test_import_states_compare_whatever_their_case(
    text: str | None, state: ImportJobState | None
) -> None:
    assert import_job_state(text) is state


def test_export_states_compare_whatever_their_case() -> None:
    assert export_job_state("FINISHED") is ExportJobState.FINISHED
    assert export_job_state("expired") is None


def test_results_columns_are_found_by_name_whatever_their_order_case_and_neighbours() -> None:
    data = (
        "\ufeffexternal account id,Industry,ACCOUNT DOMAIN,Account Name,account id\r\n"
        'X-1,Retail,a.example,"A, Inc.",11\r\n'
        ",Retail,b.example,B,12\r\n"
    ).encode()
    assert list(read_results(data)) == [
        ("11", "A, Inc.", "a.example", "X-1"),
        ("12", "B", "b.example", ""),
    ]


def test_a_results_file_without_a_column_names_it() -> None:
    data = b"Id,Name,Domain\r\n1,A,a.example\r\n"
    with pytest.raises(ValueError, match="Account ID"):
        read_results(data)


def test_an_empty_results_file_has_no_rows() -> None:
    assert list(read_results(b"")) == []
    header = ",".join(wire.EXPORT_RESULT_COLUMNS).encode()
    assert list(read_results(header + b"\r\n")) == []
