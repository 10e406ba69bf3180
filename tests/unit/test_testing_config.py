"""The harness's config writer: the file it writes is the Config it built, and typos fail early."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbsync.config import load_config, load_credentials
from dbsync.testing import ApiKeySet, AudienceConfig, build_config, write_config


def test_the_written_file_decodes_to_the_config_that_was_built(tmp_path: Path) -> None:
    """Two audiences, overrides of four tables, API key set credentials.
    Result: ``load_config`` of the file equals the Struct built from the same arguments,
    field for field, and the secrets read back are the ones given."""
    audiences = [AudienceConfig("emea", list_name="EMEA list"), AudienceConfig("na")]
    overrides = {
        "limits": {"import_jobs_per_day": 7, "day_seconds": 4.0},
        "delivery": {"max_jobs_in_flight_per_audience": 3},
        "reconcile": {"interval_seconds": 0.5, "scheduled": False},
        "daemon": {"drain_seconds": 2.5},
    }
    keys = ApiKeySet(client_id="id-1", client_secret="secret-1")
    path = write_config(tmp_path, "http://127.0.0.1:9", audiences, api_key_set=keys, **overrides)

    loaded = load_config(path)

    built = build_config(
        tmp_path,
        "http://127.0.0.1:9",
        audiences,
        credentials=loaded.destinations[0].credentials,
        **overrides,
    )
    assert loaded.destinations[0] == built.destinations[0]
    assert loaded.daemon.drain_seconds == 2.5
    assert loaded.destinations[0].limits.import_jobs_per_day == 7
    assert [a.list_name for a in loaded.destinations[0].audiences] == ["EMEA list", "List na"]
    credentials = load_credentials(loaded.destinations[0], 0)
    assert (credentials.client_id, credentials.client_secret) == ("id-1", "secret-1")


@pytest.mark.parametrize("table", ["limits", "delivery", "reconcile", "daemon", "ingest"])
def test_a_mistyped_key_fails_where_the_config_is_built(tmp_path: Path, table: str) -> None:
    """An override whose key no table has (``drain_second``).
    Result: TypeError naming the key, and no file written."""
    with pytest.raises(TypeError, match="drain_second"):
        write_config(
            tmp_path, "http://127.0.0.1:9", [AudienceConfig("a")], **{table: {"drain_second": 1}}
        )
    assert not (tmp_path / "config.toml").exists()
