"""Emulator settings and faults: defaults from the contract, constraints, and the CLI flags."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import msgspec
import pytest

from dbsync.demandbase.emulator import EmulatorSettings, Faults, StatusStorm
from dbsync.demandbase.emulator import cli as emulator_cli
from dbsync.demandbase.emulator.settings import checked
from dbsync.demandbase.wire import Endpoint


def test_defaults_are_demandbases_limits_and_the_documented_credentials() -> None:
    settings = EmulatorSettings()
    assert (settings.token, settings.client_id, settings.client_secret) == (
        "emulator-token",
        "emulator-client",
        "emulator-secret",
    )
    assert settings.token_ttl_seconds == 28_800
    assert settings.requests_per_minute == 1_000
    assert settings.day_seconds == 86_400
    assert {e: settings.daily_quota(e) for e in Endpoint} == {
        Endpoint.AUTH_TOKEN: None,
        Endpoint.IMPORT_CREATE_JOB: 1_200,
        Endpoint.IMPORT_UPLOAD: 1_200,
        Endpoint.IMPORT_JOB_STATUS: 3_600,
        Endpoint.IMPORT_JOB_LIST: 3_600,
        Endpoint.IMPORT_SOURCES: 3_600,
        Endpoint.EXPORT_CREATE_JOB: 60,
        Endpoint.EXPORT_JOB_STATUS: 300,
        Endpoint.EXPORT_JOB_LIST: 1_200,
        Endpoint.EXPORT_DOWNLOAD: None,
    }
    assert settings.concurrent_export_jobs == 1
    assert settings.export_bytes_per_day == 10 * 1000**3
    assert settings.permissions == {"import", "export"}
    assert settings.start_faults == Faults()


@pytest.mark.parametrize(
    "value",
    [
        Faults(drop_ratio=1.01),
        Faults(reset_ratio=-0.1),
        Faults(error_status=404),
        Faults(latency_ms=-1),
        EmulatorSettings(accounts=-1),
        EmulatorSettings(day_seconds=0),
        EmulatorSettings(token=""),
        EmulatorSettings(max_exchanges=0),
    ],
)
def test_constraints_hold_for_structs_built_in_python(value: msgspec.Struct) -> None:
    with pytest.raises(ValueError, match=r"\$\."):
        checked(value)


def test_a_storm_is_429_or_a_5xx() -> None:
    assert StatusStorm(status=503, count=2).status == 503
    with pytest.raises(ValueError, match="429 or a 5xx"):
        StatusStorm(status=404, count=1)
    with pytest.raises(msgspec.ValidationError, match="status_storm"):
        msgspec.json.decode(b'{"status_storm": {"status": 418, "count": 1}}', type=Faults)


def test_unknown_fields_are_refused_by_name() -> None:
    with pytest.raises(msgspec.ValidationError, match="`storm`"):
        msgspec.json.decode(b'{"storm": 3}', type=Faults)
    with pytest.raises(msgspec.ValidationError, match="`acounts`"):
        msgspec.convert({"acounts": 3}, EmulatorSettings)


def test_drop_ratio_is_a_shorthand_for_the_start_faults_and_is_given_once() -> None:
    settings = EmulatorSettings(drop_ratio=0.2, faults=Faults(latency_ms=5))
    assert settings.start_faults == Faults(drop_ratio=0.2, latency_ms=5)
    with pytest.raises(ValueError, match="not both"):
        EmulatorSettings(drop_ratio=0.2, faults=Faults(drop_ratio=0.3))


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    emulator_cli.add_arguments(parser)
    return parser.parse_args(flags)


def test_no_flags_give_the_default_settings_on_the_documented_address() -> None:
    args = parse()
    assert (args.host, args.port) == ("127.0.0.1", 8471)
    assert emulator_cli._settings(args) == EmulatorSettings()


def test_flags_set_their_settings() -> None:
    args = parse(
        "--accounts=500",
        "--seed=9",
        "--day-seconds=60",
        "--job-delay-seconds=0.5",
        "--visibility-lag-seconds=30",
        "--drop-ratio=0.1",
        "--import-concurrency=3",
        "--error-ratio=0.2",
        "--quota=export.create_job=5",
        "--quota=import.upload=7",
    )
    settings = emulator_cli._settings(args)
    assert (settings.accounts, settings.seed, settings.day_seconds) == (500, 9, 60.0)
    assert (settings.job_delay_seconds, settings.visibility_lag_seconds) == (0.5, 30.0)
    assert settings.concurrent_import_jobs == 3
    assert settings.start_faults == Faults(drop_ratio=0.1, error_ratio=0.2)
    assert settings.daily_quota(Endpoint.EXPORT_CREATE_JOB) == 5
    assert settings.daily_quota(Endpoint.IMPORT_UPLOAD) == 7


def test_the_defaults_shown_in_help_are_the_settings_defaults() -> None:
    defaults = msgspec.to_builtins(EmulatorSettings())
    for flag, field, _, text in emulator_cli._FLAGS + emulator_cli._FAULT_FLAGS:
        shown = re.search(r"\(([^()]+)\)$", text)
        assert shown is not None, flag
        value = defaults[field] if field in defaults else defaults["faults"][field]
        expected = value if isinstance(value, str) else f"{value:g}"
        assert shown[1] == expected, flag


def test_the_cli_module_imports_only_the_standard_library() -> None:
    probe = (
        "import sys, dbsync.demandbase.emulator.cli; "
        "print(sorted(m for m in ('aiohttp', 'msgspec', 'uvloop', 'asyncio') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
