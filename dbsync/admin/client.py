"""A blocking admin client: one connection, one request, one reply. No event loop.

Whatever goes wrong on our side of the socket comes back as a :class:`Fault` too,
with the code the exit status follows: nobody listening (``unreachable``, 69), the
socket file's permissions refusing us (``permission_denied``, 77), no answer in time
(``timeout``, 75). So the caller handles one shape.
"""

from __future__ import annotations

import socket
from pathlib import Path

import msgspec

from dbsync.admin.protocol import (
    AnyReply,
    AnyRequest,
    Fault,
    FaultCode,
    decode_reply,
    encode,
)

__all__ = ["REPLY_MARGIN_SECONDS", "exchange"]

# The daemon answers ``timeout`` when the wait it bounds runs out; the client waits
# this much longer for that answer before giving up by itself.
REPLY_MARGIN_SECONDS = 5.0
# Replies are bounded too (a rejected list of a million rows is not for a terminal).
_MAX_REPLY_BYTES = 256 * 1024 * 1024


def exchange(path: Path, request: AnyRequest) -> AnyReply:
    """Send ``request`` to the daemon listening at ``path``; its reply, or a Fault."""
    timeout = request.timeout_seconds + REPLY_MARGIN_SECONDS
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return Fault(code=FaultCode.UNREACHABLE, message=f"no daemon answers at {path}")
        except PermissionError:
            return Fault(
                code=FaultCode.PERMISSION_DENIED,
                message=f"{path}: permission denied (the socket's group may connect)",
            )
        except TimeoutError:
            return Fault(code=FaultCode.TIMEOUT, message=f"{path}: the daemon did not accept")
        except OSError as exc:
            return Fault(code=FaultCode.UNREACHABLE, message=f"{path}: {exc.strerror or exc}")
        try:
            sock.sendall(encode(request))
            line = _read_line(sock)
        except TimeoutError:
            return Fault(
                code=FaultCode.TIMEOUT, message=f"no answer from the daemon within {timeout:g} s"
            )
        except OSError as exc:
            return Fault(
                code=FaultCode.UNREACHABLE,
                message=f"the daemon went away before answering: {exc.strerror or exc}",
            )
    if not line:
        return Fault(
            code=FaultCode.UNREACHABLE,
            message="the daemon closed the connection without answering (stopping?)",
        )
    try:
        return decode_reply(line)
    except msgspec.DecodeError as exc:
        return Fault(code=FaultCode.INTERNAL, message=f"not a reply of this dbsync: {exc}")


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while b"\n" not in data and len(data) < _MAX_REPLY_BYTES:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return bytes(data.split(b"\n", 1)[0])
