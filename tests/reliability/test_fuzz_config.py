"""Fuzzing the config loader: a Config or a ConfigError, never another exception.

Three sources of documents, each written to a file and given to
:func:`dbsync.config.load_config` (what ``dbsync run`` and ``check-config`` call):

- the development ``config.toml`` with keys replaced by random TOML values, deleted,
  or joined by unknown ones, rendered back to TOML (most reach the validation);
- random documents built from the configuration's key names and random values;
- ``config.toml``'s text cut, spliced and garbled (most fail to parse).

Examples: the ``short`` profile in the default run, ``long`` with
``HYPOTHESIS_PROFILE=long`` (tests/reliability/profiles.py).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbsync.config import Config, load_config
from dbsync.errors import ConfigError
from tests.reliability.profiles import FUZZ_TIMEOUT_SECONDS

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(FUZZ_TIMEOUT_SECONDS)]

CONFIG_TOML = Path(__file__).parents[2] / "config.toml"
VALID_TEXT = CONFIG_TOML.read_text()
VALID = tomllib.loads(VALID_TEXT)


def _key_names(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _key_names(v)}
    if isinstance(value, list):
        return {k for v in value for k in _key_names(v)}
    return set()


KEYS = st.sampled_from(sorted(_key_names(VALID))) | st.text(max_size=6)
SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["", "state", "/", "../x", "file", "credential", "https://x", "ups"])
    | st.datetimes()
    | st.dates()
    | st.times()
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


def render(document: dict[str, Any]) -> str:
    """A TOML document: each top-level key on its line, tables inline."""
    return "".join(f"{_key(k)} = {_value(v)}\n" for k, v in document.items())


def _key(key: str) -> str:
    return json.dumps(key)


def _value(value: Any) -> str:
    match value:
        case bool():
            return "true" if value else "false"
        case int():
            return str(value)
        case float() if math.isnan(value):
            return "nan"
        case float() if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        case float():
            return repr(value)
        case str():
            return json.dumps(value)  # lone surrogates come out as escapes TOML refuses
        case dt.datetime() | dt.date() | dt.time():
            return value.isoformat()
        case list():
            return "[" + ", ".join(_value(v) for v in value) + "]"
        case dict():
            return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


PATHS = _paths(VALID)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """config.toml with one to four keys replaced, deleted or added."""
    document = json.loads(json.dumps(VALID))  # a deep copy (config.toml has no dates)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        parent = document
        try:
            for step in path[:-1]:
                parent = parent[step]
            match draw(st.sampled_from(["replace", "delete", "add"])):
                case "replace":
                    parent[path[-1]] = draw(VALUES)
                case "delete" if isinstance(parent, dict):
                    del parent[path[-1]]
                case "delete" if isinstance(parent, list):
                    parent.pop(path[-1])
                case "add" if isinstance(parent, dict):
                    parent[draw(KEYS)] = draw(VALUES)
        except (KeyError, IndexError, TypeError, AttributeError):
            pass  # an earlier mutation removed or replaced the path
    return render(document)


@st.composite
def garbled(draw: st.DrawFn) -> bytes:
    """config.toml's text with a slice cut out, another spliced in, and noise."""
    data = VALID_TEXT.encode()
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, min(len(data), start + 400)))
    at = draw(st.integers(0, len(data)))
    data = data[:start] + draw(st.binary(max_size=20)) + data[end:]
    return data[:at] + data[start:end] + data[at:]


DOCUMENTS = (
    mutated().map(str.encode)
    | st.dictionaries(KEYS, VALUES, max_size=6).map(render).map(str.encode)
    | garbled()
)


def test_load_config_returns_a_config_or_raises_config_error(tmp_path: Path) -> None:
    """Random documents (see the module docstring) written to a file.
    Result: load_config returns a Config or raises ConfigError with a message, never
    anything else; the unmutated config.toml loads (so the outcome is not all refusals)."""
    path = tmp_path / "config.toml"
    path.write_text(VALID_TEXT)
    assert isinstance(load_config(path), Config)
    outcomes = {"config": 0, "error": 0}

    @given(document=DOCUMENTS)
    def one(document: bytes) -> None:
        path.write_bytes(document)
        try:
            config: Config | None = load_config(path)
        except ConfigError as exc:
            config, error = None, str(exc)
        if config is None:
            assert error, "a ConfigError names what is wrong"
            outcomes["error"] += 1
        else:
            assert isinstance(config, Config)
            outcomes["config"] += 1

    one()
    print(f"outcomes: {outcomes}")
    assert outcomes["error"], outcomes
