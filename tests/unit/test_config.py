"""The configuration: the shipped file loads, defaults hold, every mistake names its key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest

from dbsync.config import (
    Config,
    Credentials,
    SecretRef,
    check_secrets,
    decode_config,
    load_config,
    load_credentials,
    load_ingest_token,
    read_secret,
)
from dbsync.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-t0ken-value"

DESTINATION = """
[[destinations]]
name = "tenant"
credentials = { token = { file = "token" } }
"""


def audience(audience_id: str = "a1", name: str = "Audience one", **keys: str) -> str:
    extra = "".join(f"{key} = {value}\n" for key, value in keys.items())
    return (
        f'[[destinations.audiences]]\nid = "{audience_id}"\nname = "{name}"\n'
        f'origin = "segmentation"\n{extra}'
    )


VALID = DESTINATION + audience()


@pytest.fixture
def base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config directory holding the secret file ``token``; no systemd credentials."""
    (tmp_path / "token").touch(mode=0o600)
    (tmp_path / "token").write_text(SECRET + "\n")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    return tmp_path


def decode(text: str, base_dir: Path) -> Config:
    return decode_config(text.encode(), base_dir=base_dir)


# --- The shipped development config ------------------------------------------------


@pytest.mark.usefixtures("private_dev_credentials")
def test_shipped_config_loads_and_feeds_the_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = load_config(REPO / "config.toml")

    assert config.daemon.state_dir == REPO / "state"
    assert config.daemon.admin_socket == REPO / "state" / "admin.sock"
    assert (config.ingest.host, config.ingest.port) == ("127.0.0.1", 8470)
    [destination] = config.destinations
    assert destination.base_url == "http://127.0.0.1:8471"
    assert [audience.name for _, audience in config.audiences()] == [
        "High-intent EMEA accounts",
        "Open opportunities, North America",
        "Expansion targets: enterprise customers",
    ]
    assert load_credentials(destination, 0).token == "emulator-token"
    assert check_secrets(config) == []


def test_shipped_config_lists_every_key() -> None:
    """Each key of every table appears in config.toml: set, commented out, or a table."""
    text = (REPO / "config.toml").read_text()
    missing = [
        key
        for key in _all_keys(mi.type_info(Config))
        if not re.search(rf"^(# )?{key} =|\{{ {key} =|^\[\[?([a-z_]+\.)*{key}\]", text, re.M)
    ]
    assert missing == []


def _all_keys(type_: mi.Type) -> set[str]:
    if isinstance(type_, mi.Metadata):
        return _all_keys(type_.type)
    if isinstance(type_, mi.UnionType):
        return set().union(*map(_all_keys, type_.types))
    if isinstance(type_, mi.VarTupleType):
        return _all_keys(type_.item_type)
    if isinstance(type_, mi.StructType):
        keys = {field.encode_name for field in type_.fields}
        return keys.union(*(_all_keys(field.type) for field in type_.fields))
    return set()


def test_api_key_set_alternative_of_the_shipped_config_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = (REPO / "config.toml").read_text()
    text = text.replace("\ntoken = ", "\n# token = ").replace("# client_", "client_")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(REPO / "dev" / "credentials"))

    config = decode_config(text.encode(), base_dir=REPO)

    credentials = load_credentials(config.destinations[0], 0)
    assert (credentials.token, credentials.client_id, credentials.client_secret) == (
        None,
        "emulator-client",
        "emulator-secret",
    )


# --- Defaults the engine relies on ------------------------------------------------


def test_defaults(base_dir: Path) -> None:
    config = decode(VALID, base_dir)

    daemon, ingest = config.daemon, config.ingest
    assert (daemon.drain_seconds, daemon.summary_interval_seconds) == (20, 60)
    assert (daemon.admin_viewer_group, daemon.admin_operator_group) == (None, None)
    assert (daemon.restart_max_crashes, daemon.restart_window_seconds) == (5, 600)
    assert (daemon.restart_backoff_seconds, daemon.restart_backoff_max_seconds) == (1, 300)
    assert (ingest.host, ingest.port, ingest.token_file) == ("127.0.0.1", 8470, None)
    assert ingest.max_body_bytes == 64 * 1024 * 1024
    mapping = ingest.aep_mapping
    assert (mapping.name_attribute, mapping.domain_attribute, mapping.external_id_attribute) == (
        "accountName",
        "accountOrganization.domain",
        "accountKey.sourceKey",
    )
    assert mapping.identity_namespace is None
    assert (config.logging.level, config.logging.format) == ("info", "json")

    [destination] = config.destinations
    assert destination.base_url == "https://uapi.demandbase.com"
    assert (destination.entity_type, destination.description) == ("account", "")
    assert destination.request_timeout_seconds == 30
    assert msgspec.structs.asdict(destination.limits) == {
        "requests_per_minute": 1000,
        "import_jobs_per_day": 1200,
        "import_uploads_per_day": 1200,
        "import_status_per_day": 3600,
        "import_list_per_day": 3600,
        "export_jobs_per_day": 60,
        "export_status_per_day": 300,
        "concurrent_import_jobs": 10,
        "concurrent_export_jobs": 1,
        "export_bytes_per_day": 10_000_000_000,
        "day_seconds": 86400,
        "quota_safety_margin": 0.02,
    }
    assert destination.reconcile.visibility_lag_seconds == 86400
    assert destination.reconcile.interval_seconds == 86400

    [only] = destination.audiences
    assert (only.list_name, only.list_id, only.requests_per_minute, only.paused) == (
        "Audience one",
        None,
        60,
        False,
    )
    assert (only.flush.max_records, only.flush.max_age_seconds) == (10_000, 60)


def test_relative_paths_resolve_against_the_config_directory(base_dir: Path) -> None:
    config = decode(
        '[daemon]\nstate_dir = "var/state"\n[ingest]\ntoken_file = "ingest-token"\n' + VALID,
        base_dir,
    )

    assert config.daemon.state_dir == base_dir / "var" / "state"
    # The socket is something the daemon creates: relative to the state directory.
    assert config.daemon.admin_socket == base_dir / "var" / "state" / "admin.sock"
    assert config.ingest.token_file == base_dir / "ingest-token"
    assert config.destinations[0].credentials.token is not None
    assert config.destinations[0].credentials.token.file == base_dir / "token"


def test_absolute_paths_are_kept(base_dir: Path) -> None:
    config = decode(
        '[daemon]\nstate_dir = "/var/lib/dbsync"\nadmin_socket = "/run/dbsync/admin.sock"\n'
        + VALID,
        base_dir,
    )

    assert config.daemon.state_dir == Path("/var/lib/dbsync")
    assert config.daemon.admin_socket == Path("/run/dbsync/admin.sock")


def test_lookup_and_iteration_follow_file_order(base_dir: Path) -> None:
    second = DESTINATION.replace('"tenant"', '"other"')
    config = decode(VALID + audience("a2", "Two") + second + audience("b1", "Three"), base_dir)

    assert [(d.name, a.id) for d, a in config.audiences()] == [
        ("tenant", "a1"),
        ("tenant", "a2"),
        ("other", "b1"),
    ]
    found = config.audience("b1")
    assert found is not None
    assert (found[0].name, found[1].name) == ("other", "Three")
    assert config.audience("nope") is None


def test_accepted_spellings(base_dir: Path) -> None:
    text = (
        DESTINATION.replace('name = "tenant"', 'name = "tenant"\nentity_type = "Account"')
        + audience().replace('"segmentation"', '"REAL_TIME_CUSTOMER_PROFILE"')
        + "[destinations.reconcile]\nvisibility_lag_seconds = 0\n"
    )
    text = text.replace('name = "tenant"', 'name = "tenant"\nbase_url = "http://127.0.0.1:8471/"')

    [destination] = decode(text, base_dir).destinations

    assert destination.base_url == "http://127.0.0.1:8471"
    assert destination.reconcile.visibility_lag_seconds == 0


def test_one_list_name_may_serve_two_destinations(base_dir: Path) -> None:
    second = DESTINATION.replace('"tenant"', '"other"')
    config = decode(VALID + second + audience("b1", "Audience one"), base_dir)

    assert [a.list_name for _, a in config.audiences()] == ["Audience one", "Audience one"]


# --- Every mistake names its key -------------------------------------------------

LONG = "x" * 120

INVALID = [
    # Unknown keys, at each level.
    pytest.param("colour = 1\n" + VALID, "colour", "unknown key", id="unknown-top-level"),
    pytest.param(
        "[daemon]\ndrain_secnds = 3\n" + VALID,
        "daemon.drain_secnds",
        "did you mean `drain_seconds`?",
        id="unknown-daemon",
    ),
    pytest.param(
        '[ingest.aep_mapping]\nname = "x"\n' + VALID,
        "ingest.aep_mapping.name",
        "unknown key",
        id="unknown-aep-mapping",
    ),
    pytest.param(
        '[logging]\ncolor = "auto"\n' + VALID, "logging.color", "unknown key", id="unknown-logging"
    ),
    pytest.param(
        DESTINATION + "colour = 1\n", "destinations[0].colour", "unknown key", id="unknown-dest"
    ),
    pytest.param(
        DESTINATION.replace("file =", "path ="),
        "destinations[0].credentials.token.path",
        "unknown key; known keys here: file, credential",
        id="unknown-secret-ref",
    ),
    pytest.param(
        DESTINATION + "[destinations.limits]\nrequests_per_hour = 1\n",
        "destinations[0].limits.requests_per_hour",
        "did you mean `requests_per_minute`?",
        id="unknown-limits",
    ),
    pytest.param(
        DESTINATION + "[destinations.reconcile]\nenabled = false\n",
        "destinations[0].reconcile.enabled",
        "unknown key",
        id="unknown-reconcile",
    ),
    pytest.param(
        VALID + audience("a2", "Two", list="2"),
        "destinations[0].audiences[1].list",
        "unknown key",
        id="unknown-audience",
    ),
    pytest.param(
        VALID + "[destinations.audiences.flush]\nmax_rows = 5\n",
        "destinations[0].audiences[0].flush.max_rows",
        "did you mean `max_records`?",
        id="unknown-flush",
    ),
    # Wrong types, values out of range, bad enums.
    pytest.param(
        '[ingest]\nport = "8470"\n' + VALID, "ingest.port", "expected `int`", id="wrong-type"
    ),
    pytest.param("[ingest]\nport = 70000\n" + VALID, "ingest.port", "<= 65535", id="port-range"),
    pytest.param(
        "[daemon]\ndrain_seconds = -1\n" + VALID,
        "daemon.drain_seconds",
        ">= 0.01; allowed: from 0.01 to 604800 (finite)",
        id="negative",
    ),
    pytest.param(
        "[daemon]\nstate_dir = 3\n" + VALID, "daemon.state_dir", "expected a path", id="path-type"
    ),
    pytest.param(
        '[logging]\nlevel = "verbose"\n' + VALID,
        "logging.level",
        "expected one of: debug, error, info, warning",
        id="bad-enum",
    ),
    pytest.param(
        DESTINATION + "[destinations.limits]\nquota_safety_margin = 0.5\n",
        "destinations[0].limits.quota_safety_margin",
        "< 0.5",
        id="margin-range",
    ),
    pytest.param(
        VALID + "[destinations.audiences.flush]\nmax_records = 1000001\n",
        "destinations[0].audiences[0].flush.max_records",
        "<= 1000000",
        id="flush-range",
    ),
    pytest.param(
        VALID + "[destinations.audiences.flush]\nmax_age_seconds = 0\n",
        "destinations[0].audiences[0].flush.max_age_seconds",
        ">= 0.01",
        id="flush-age",
    ),
    pytest.param(
        VALID + audience("a 2"),
        "destinations[0].audiences[1].id",
        "matching regex",
        id="audience-id-characters",
    ),
    pytest.param(
        VALID + audience("a" * 129),
        "destinations[0].audiences[1].id",
        "length <= 128",
        id="audience-id-length",
    ),
    pytest.param(
        DESTINATION + '[[destinations.audiences]]\nid = "a1"\nname = "One"\n',
        "destinations[0].audiences[0].origin",
        "required key is missing",
        id="missing-key",
    ),
    # Origins.
    pytest.param(
        DESTINATION + audience().replace('"segmentation"', '"custom_upload"'),
        "destinations[0].audiences[0].origin",
        "custom CSV uploads cannot be activated to Demandbase; only audiences built by"
        " segmentation can",
        id="custom-upload",
    ),
    pytest.param(
        DESTINATION + audience().replace('"segmentation"', '"CUSTOM_UPLOAD"'),
        "destinations[0].audiences[0].origin",
        "custom CSV uploads cannot be activated",
        id="custom-upload-aep-name",
    ),
    pytest.param(
        DESTINATION + audience().replace('"segmentation"', '"lookalike"'),
        "destinations[0].audiences[0].origin",
        "accepted (ignoring case): segmentation, real_time_customer_profile",
        id="unknown-origin",
    ),
    # Names, ids and lists.
    pytest.param(
        VALID + audience("a2", "Two", list_name='"audience ONE"'),
        "destinations[0].audiences[1].list_name",
        "also fed by destinations[0].audiences[0]",
        id="duplicate-list-name",
    ),
    pytest.param(
        VALID + audience("a2", "Two", list_name='"x' + "y" * 255 + '"'),
        "destinations[0].audiences[1].list_name",
        "length <= 255",
        id="list-name-length",
    ),
    pytest.param(
        VALID + audience("a2", "   "),
        "destinations[0].audiences[1].name",
        "must not be blank",
        id="blank-name",
    ),
    pytest.param(
        DESTINATION + audience(list_id="7") + audience("a2", "Two", list_id="7"),
        "destinations[0].audiences[1].list_id",
        "list id 7 is also destinations[0].audiences[0]'s",
        id="duplicate-list-id",
    ),
    pytest.param(
        VALID + DESTINATION.replace('"tenant"', '"other"') + audience("a1", "Other"),
        "destinations[1].audiences[0].id",
        "ids must be unique in the whole configuration",
        id="duplicate-audience-id",
    ),
    pytest.param(
        VALID + DESTINATION,
        "destinations[1].name",
        "destination name 'tenant' is also destinations[0]'s",
        id="duplicate-destination-name",
    ),
    pytest.param(
        DESTINATION + 'entity_type = "person"\n',
        "destinations[0].entity_type",
        "only account audiences can be activated",
        id="entity-type",
    ),
    # Base URL.
    pytest.param(
        DESTINATION + 'base_url = "ftp://uapi.demandbase.com"\n',
        "destinations[0].base_url",
        "not an http:// or https:// URL with a host",
        id="base-url-scheme",
    ),
    pytest.param(
        DESTINATION + 'base_url = "https://"\n',
        "destinations[0].base_url",
        "with a host",
        id="base-url-host",
    ),
    pytest.param(
        DESTINATION + 'base_url = "https://user:pw@uapi.demandbase.com"\n',
        "destinations[0].base_url",
        "must not carry credentials",
        id="base-url-credentials",
    ),
    # Credentials.
    pytest.param(
        DESTINATION.replace('{ file = "token" }', f'"{SECRET}"'),
        "destinations[0].credentials.token",
        "secrets are never written in the configuration",
        id="inline-secret",
    ),
    pytest.param(
        DESTINATION.replace(" }\n", ', client_id = { file = "token" } }\n'),
        "destinations[0].credentials",
        "not both",
        id="token-and-key-set",
    ),
    pytest.param(
        DESTINATION.replace('token = { file = "token" }', ""),
        "destinations[0].credentials",
        "set either token",
        id="no-credentials",
    ),
    pytest.param(
        DESTINATION.replace("token =", "client_id ="),
        "destinations[0].credentials.client_secret",
        "an API key set needs client_id and client_secret",
        id="half-a-key-set",
    ),
    pytest.param(
        DESTINATION.replace('"token" }', '"token", credential = "db" }'),
        "destinations[0].credentials.token",
        'set exactly one of file = "path" or credential = "name"',
        id="file-and-credential",
    ),
    pytest.param(
        DESTINATION.replace('"token" }', '"missing" }'),
        "destinations[0].credentials.token.file",
        "cannot read secret",
        id="missing-secret-file",
    ),
    pytest.param(
        DESTINATION.replace('file = "token"', 'credential = "../token"'),
        "destinations[0].credentials.token.credential",
        "matching regex",
        id="credential-name",
    ),
    # The daemon's own settings.
    pytest.param(
        f'[daemon]\nadmin_socket = "/tmp/{LONG}"\n' + VALID,
        "daemon.admin_socket",
        "a Unix socket path may have at most 107",
        id="socket-path-too-long",
    ),
    pytest.param(
        '[daemon]\nadmin_operator_group = "no-such-group-here"\n' + VALID,
        "daemon.admin_operator_group",
        "no group 'no-such-group-here'",
        id="unknown-group",
    ),
    pytest.param(
        "[daemon]\nrestart_backoff_seconds = 10\nrestart_backoff_max_seconds = 5\n" + VALID,
        "daemon.restart_backoff_max_seconds",
        "is shorter than restart_backoff_seconds",
        id="restart-backoff-inverted",
    ),
    pytest.param(
        "[daemon]\nrestart_max_crashes = 0\n" + VALID,
        "daemon.restart_max_crashes",
        ">= 1",
        id="restart-budget-zero",
    ),
    pytest.param(
        '[ingest]\ntoken_file = "absent"\n' + VALID,
        "ingest.token_file",
        "cannot read secret",
        id="missing-ingest-token",
    ),
    pytest.param("[daemon\n" + VALID, "", "not valid TOML", id="toml-syntax"),
    *(
        pytest.param(f"[ingest]\n{key} = {value}\n" + VALID, f"ingest.{key}", message, id=key)
        for key, value, message in [
            ("header_timeout_seconds", "0", ">= 0.1"),
            ("body_timeout_seconds", "1e9", "<= 3600"),
            ("idle_timeout_seconds", "inf", "<= 3600"),
            ("max_connections", "0", ">= 1"),
            ("max_body_bytes_in_flight", "1024", ">= 1048576"),
            ("body_wait_seconds", "-1", ">= 0"),
        ]
    ),
]


def destination_with(line: str) -> str:
    """VALID with one more key in its [[destinations]] table."""
    return DESTINATION.replace('name = "tenant"\n', f'name = "tenant"\n{line}\n') + audience()


# Values that decode, and that no operator means: each is refused naming the key and
# the range it must be in.
DEGENERATE = [
    pytest.param(
        "[daemon]\nsummary_interval_seconds = 1e-300\n" + VALID,
        "daemon.summary_interval_seconds",
        "allowed: from 1 to 86400 (finite)",
        id="summary-flood",
    ),
    pytest.param(
        "[daemon]\ndrain_seconds = inf\n" + VALID,
        "daemon.drain_seconds",
        "allowed: from 0.01 to 604800 (finite)",
        id="infinite-drain",
    ),
    pytest.param(
        "[daemon]\nrestart_window_seconds = nan\n" + VALID,
        "daemon.restart_window_seconds",
        "allowed: from 0.01 to 604800 (finite)",
        id="nan-window",
    ),
    pytest.param(
        destination_with("request_timeout_seconds = inf"),
        "destinations[0].request_timeout_seconds",
        "allowed: from 0.1 to 3600 (finite)",
        id="infinite-request-timeout",
    ),
    pytest.param(
        VALID + "[destinations.delivery]\nbacklog_eta_warn_hours = 0\n",
        "destinations[0].delivery.backlog_eta_warn_hours",
        "allowed: above 0 to 8760 (finite)",
        id="no-warn-hours",
    ),
    pytest.param(
        VALID + "[destinations.delivery]\nbacklog_eta_warn_hours = inf\n",
        "destinations[0].delivery.backlog_eta_warn_hours",
        "allowed: above 0 to 8760 (finite)",
        id="infinite-warn-hours",
    ),
    pytest.param(
        VALID + "[destinations.delivery]\njob_poll_initial_seconds = 1e-9\n",
        "destinations[0].delivery.job_poll_initial_seconds",
        "allowed: from 0.01 to 604800 (finite)",
        id="tiny-poll",
    ),
    pytest.param(
        VALID + "[destinations.reconcile]\nvisibility_lag_seconds = -inf\n",
        "destinations[0].reconcile.visibility_lag_seconds",
        "allowed: from 0 to 604800 (finite)",
        id="negative-infinite-lag",
    ),
    pytest.param("", "destinations", "at least one [[destinations]]", id="empty-file"),
    pytest.param(
        "[daemon]\ndrain_seconds = 5\n", "destinations", "no destination", id="no-destination"
    ),
    pytest.param(
        destination_with('base_url = "http://uapi.demandbase.com"'),
        "destinations[0].base_url",
        "https:// is required unless the host is loopback",
        id="plaintext-remote",
    ),
    pytest.param(
        destination_with('base_url = "http://10.0.0.7:8471"'),
        "destinations[0].base_url",
        "would send the bearer token in clear",
        id="plaintext-private-address",
    ),
]


@pytest.mark.parametrize(("text", "key", "message"), DEGENERATE)
def test_degenerate_configuration_is_refused_with_the_allowed_range(
    text: str, key: str, message: str, base_dir: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        decode(text, base_dir)

    assert caught.value.key == key
    assert message in caught.value.message


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:8471", "http://127.8.9.10", "http://[::1]:8471", "http://localhost"],
)
def test_plain_http_is_accepted_to_loopback_only(base_url: str, base_dir: Path) -> None:
    config = decode(destination_with(f'base_url = "{base_url}"'), base_dir)

    assert config.destinations[0].base_url == base_url


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_secret_file_open_to_group_or_others_is_refused_like_ssh(tmp_path: Path, mode: int) -> None:
    token = tmp_path / "token"
    token.write_text(SECRET + "\n")
    token.chmod(mode)

    with pytest.raises(ConfigError) as caught:
        read_secret(SecretRef(file=token), key="destinations[0].credentials.token")

    assert caught.value.key == "destinations[0].credentials.token.file"
    assert caught.value.message.startswith(f"permissions {mode:04o} for {token} are too open")
    assert SECRET not in str(caught.value)


def test_secret_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    token = tmp_path / "token"
    token.touch(mode=0o600)
    token.write_text(SECRET + "\n")
    os.chown(token, 4242, 4242)

    with pytest.raises(ConfigError) as caught:
        read_secret(SecretRef(file=token), key="destinations[0].credentials.token")

    assert "owned by uid 4242" in caught.value.message
    assert "daemon's user" in caught.value.message


def test_ingest_token_file_must_be_private(base_dir: Path) -> None:
    config = decode('[ingest]\ntoken_file = "token"\n' + VALID, base_dir)
    (base_dir / "token").chmod(0o644)

    with pytest.raises(ConfigError) as caught:
        load_ingest_token(config.ingest)

    assert caught.value.key == "ingest.token_file"
    assert "are too open" in caught.value.message


@pytest.mark.parametrize(("text", "key", "message"), INVALID)
def test_invalid_configuration_names_the_key(
    text: str, key: str, message: str, base_dir: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        check_secrets(decode(text, base_dir))

    assert caught.value.key == key
    assert message in caught.value.message


def test_toml_syntax_error_names_line_and_column(base_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"at line 3, column 9"):
        decode("[daemon]\ndrain_seconds = 1\nlevel = = 2\n", base_dir)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.key == ""
    assert str(path) in caught.value.message


def test_non_utf8_file_is_refused(base_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        decode_config(b"# ok\nname = '\xff'", base_dir=base_dir)

    assert caught.value.key == ""
    assert caught.value.message == "not UTF-8 text: byte 0xff at offset 13 (line 2, column 9)"


# --- Secrets --------------------------------------------------------------------


def test_secret_file_loses_one_trailing_newline(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.touch(mode=0o600)
    for content in (f"{SECRET}\n", f"{SECRET}\r\n", SECRET):
        token.write_text(content, newline="")
        assert read_secret(SecretRef(file=token), key="k") == SECRET


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("\n", "is empty"),
        (f"{SECRET}\nsecond line\n", "has more than one line"),
        (f" {SECRET}\n", "starts or ends with white space"),
    ],
)
def test_bad_secret_file_is_named_never_shown(tmp_path: Path, content: str, message: str) -> None:
    token = tmp_path / "token"
    token.touch(mode=0o600)
    token.write_text(content)

    with pytest.raises(ConfigError) as caught:
        read_secret(SecretRef(file=token), key="destinations[0].credentials.token")

    assert caught.value.key == "destinations[0].credentials.token.file"
    assert message in caught.value.message
    assert str(token) in caught.value.message
    assert SECRET not in str(caught.value)


def test_systemd_credential_is_read_from_the_credentials_directory(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials_directory = tmp_path / "credentials"
    credentials_directory.mkdir()
    (credentials_directory / "demandbase-client-id").write_text("client\n")
    (credentials_directory / "demandbase-client-secret").write_text(SECRET + "\n")
    text = DESTINATION.replace(
        'token = { file = "token" }',
        'client_id = { credential = "demandbase-client-id" },'
        ' client_secret = { credential = "demandbase-client-secret" }',
    )
    config = decode(text, base_dir)

    with pytest.raises(ConfigError) as caught:
        load_credentials(config.destinations[0], 0)
    assert caught.value.key == "destinations[0].credentials.client_id.credential"
    assert "$CREDENTIALS_DIRECTORY is not set" in caught.value.message
    assert len(check_secrets(config)) == 2  # outside systemd: noted, not failed

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials_directory))
    credentials = load_credentials(config.destinations[0], 0)
    assert (credentials.client_id, credentials.client_secret) == ("client", SECRET)
    assert check_secrets(config) == []


def test_secrets_never_appear_in_repr_or_str(base_dir: Path) -> None:
    config = decode(VALID, base_dir)
    credentials = load_credentials(config.destinations[0], 0)

    assert credentials.token == SECRET
    for shown in (repr(config), str(config), repr(credentials), str(credentials)):
        assert SECRET not in shown
    assert repr(credentials) == "Credentials(token=<redacted>)"
    with pytest.raises(TypeError):
        msgspec.json.encode(credentials)


def test_fingerprint_changes_with_the_secret_only() -> None:
    one = Credentials(token=SECRET)

    assert one.fingerprint == Credentials(token=SECRET).fingerprint
    assert one.fingerprint != Credentials(token=SECRET + "x").fingerprint
    assert one.fingerprint != Credentials(client_id=SECRET, client_secret="").fingerprint
    assert SECRET not in one.fingerprint


def test_ingest_token(base_dir: Path) -> None:
    assert load_ingest_token(decode(VALID, base_dir).ingest) is None
    config = decode('[ingest]\ntoken_file = "token"\n' + VALID, base_dir)

    assert load_ingest_token(config.ingest) == SECRET
