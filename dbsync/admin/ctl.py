"""``dbsync ctl``: talk to a running daemon over its admin socket.

    dbsync ctl [--socket PATH | --config PATH] [--json] [--timeout SECONDS] VERB [AUDIENCE]

The verbs and their arguments are derived from the protocol's request Structs
(:data:`dbsync.admin.protocol.REQUESTS`): a verb added there shows up here. Output is
aligned tables for people, or with ``--json`` the daemon's reply as one JSON document
(a fault included, so that a script always reads one document). Exit codes are
INTERFACES.md's: 0 done; 1 the daemon answered with a fault; 2 usage; 69 no daemon
answers; 75 timed out; 77 permission denied; 78 the configuration is invalid (ours,
when it names the socket, or the one a ``reload`` was asked to apply).

It must start fast: a blocking socket and msgspec, no event loop, nothing of the
daemon (a test holds it to that). The socket is ``--socket``, else the one the
configuration names; reading the configuration is cheap (no secret is read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec

from dbsync.admin.protocol import (
    DEFAULT_TIMEOUT_SECONDS,
    REQUESTS,
    AnyRequest,
    Fault,
    FaultCode,
)
from dbsync.admin.render import render
from dbsync.exitcodes import ExitCode

__all__ = ["add_arguments", "render", "run"]


# --- the command line ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``ctl``'s options and one sub-command per verb of the protocol."""
    _add_options(parser, argparse.SUPPRESS)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for request in REQUESTS:
        verb = str(request.__struct_config__.tag)
        summary = (request.__doc__ or "").strip().splitlines()[0]
        sub = verbs.add_parser(verb, help=summary, description=summary)
        fields = request.__struct_fields__
        if "audience" in fields:
            required = "audience" not in _optional_fields(request)
            sub.add_argument(
                "audience", metavar="AUDIENCE", nargs=None if required else "?", default=None
            )
        if "limit" in fields:
            sub.add_argument("--limit", type=int, help="show at most this many")
        # The options are accepted after the verb too: `dbsync ctl status --json`.
        _add_options(sub, argparse.SUPPRESS)
        sub.set_defaults(request_type=request)


def _add_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--socket", default=default, help="the admin socket (default: config's)")
    parser.add_argument(
        "--config",
        default=default,
        help=(
            "config naming the socket (default: $DBSYNC_CONFIG, else"
            " /etc/dbsync/config.toml if it exists, else ./config.toml)"
        ),
    )
    parser.add_argument(
        "--json", action="store_true", default=default, help="print the reply as JSON"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help=f"wait at most this long for the effect ({DEFAULT_TIMEOUT_SECONDS:g})",
    )


def _optional_fields(request: type) -> set[str]:
    import msgspec.inspect as mi

    info = mi.type_info(request)
    assert isinstance(info, mi.StructType)
    return {f.name for f in info.fields if not f.required}


def run(args: argparse.Namespace, *, config_path: Path) -> int:
    """The ``dbsync ctl`` entry point; ``config_path`` is the default chain's answer."""
    from dbsync.admin.client import exchange

    as_json = bool(getattr(args, "json", False))
    request = _request(args)
    if isinstance(request, Fault):
        return _fail(request, as_json)
    socket = getattr(args, "socket", None)
    if socket is None:
        path = Path(args.config) if getattr(args, "config", None) else config_path
        found = _socket_of(path)
        if isinstance(found, Fault):
            return _fail(found, as_json)
        socket = found
    reply = exchange(Path(socket), request)
    if isinstance(reply, Fault):
        return _fail(reply, as_json)
    print(msgspec.json.encode(reply).decode() if as_json else render(reply))
    return ExitCode.OK


def _request(args: argparse.Namespace) -> AnyRequest | Fault:
    keys: dict[str, object] = {"verb": args.request_type.__struct_config__.tag}
    for name in ("audience", "limit"):
        if getattr(args, name, None) is not None:
            keys[name] = getattr(args, name)
    if getattr(args, "timeout", None) is not None:
        keys["timeout_seconds"] = args.timeout
    try:
        request: AnyRequest = msgspec.convert(keys, AnyRequest)  # the daemon's checks, here
        return request
    except msgspec.ValidationError as exc:
        return Fault(code=FaultCode.BAD_REQUEST, message=str(exc))


def _socket_of(config_path: Path) -> str | Fault:
    from dbsync.config import load_config
    from dbsync.errors import ConfigError

    try:
        return str(load_config(config_path).daemon.admin_socket)
    except ConfigError as exc:
        return Fault(
            code=FaultCode.CONFIG_INVALID,
            message=f"invalid configuration {config_path}: {exc} (or give --socket)",
        )


def _fail(fault: Fault, as_json: bool) -> int:
    if as_json:
        print(msgspec.json.encode(fault).decode())
    print(f"dbsync ctl: {fault.message} [{fault.code}]", file=sys.stderr)
    return fault.code.exit_code
