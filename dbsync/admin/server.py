"""The admin socket: a Unix stream socket, one request and one reply per connection.

Life, as :mod:`dbsync.daemon` drives it:

1. :meth:`AdminServer.bind`, before the store opens. The socket's directory is
   created 0750 if missing (systemd's RuntimeDirectory= makes it otherwise). A file
   already at the path is probed: if a daemon answers there, this one refuses to start
   (``admin_socket_in_use``, exit 1) rather than share its store; if nobody does, the
   file is a stale leftover of a crash and is removed. The socket is bound under a
   temporary name, set to 0660, then linked to its path, so that it never shows at
   its path with looser permissions and never replaces a file that appeared
   meanwhile. It listens from then on: a ``dbsync ctl`` that connects while the daemon
   starts waits in the backlog rather than being refused.
2. :meth:`AdminServer.serve`, once the supervisor has started its actors (before
   ``READY=1``): it accepts connections, each exchange in its own task of the server's
   TaskGroup (``admin:exchange``). When the process is out of descriptors (EMFILE,
   ENFILE: a flood of connections elsewhere), accept backs off and tries again, logging
   ``admin_accept_failed`` once per episode and ``admin_accept_recovered`` after it: a
   ``dbsync ctl`` waits in the backlog instead of ending the daemon.
3. :meth:`AdminServer.close`, at shutdown once intake has stopped: no more
   connections; exchanges in progress get :data:`_CLOSE_GRACE_SECONDS` to answer (a
   ``drain`` answers at once) and are then cut; the socket file is removed, if it is
   still ours.

Each exchange: read one line (at most ``MAX_REQUEST_BYTES``, within
:data:`_READ_SECONDS`), decode it, decide the caller's role from SO_PEERCRED
(:mod:`dbsync.admin.access`), :func:`~dbsync.admin.verbs.perform`, write one line.
Every verb that changes something, and every refusal, is logged as ``admin_command``
with the caller's uid and pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

import msgspec

from dbsync.admin.access import Access, Peer, peer_of
from dbsync.admin.controls import AdminFault, Controls
from dbsync.admin.protocol import (
    MAX_REQUEST_BYTES,
    Fault,
    FaultCode,
    Reply,
    Role,
    decode_request,
    encode,
)
from dbsync.admin.verbs import perform
from dbsync.restarts import describe

__all__ = ["AdminServer", "AdminSocketError"]

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
DIRECTORY_MODE = 0o750
_BACKLOG = 16
# A client that connects and says nothing is dropped after this.
_READ_SECONDS = 5.0
# A reply the client does not read is dropped after this.
_WRITE_SECONDS = 10.0
# At close, exchanges in progress have this long to answer.
_CLOSE_GRACE_SECONDS = 2.0
# How long the start-up probe of an existing socket file waits for a connection.
_PROBE_SECONDS = 1.0
# accept() errors that say the process or system is out of a resource for now; the
# accept loop backs off (up to this long between tries) instead of ending the daemon.
_ACCEPT_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF_MAX_SECONDS = 1.0


class AdminSocketError(Exception):
    """The admin socket cannot be set up; the event logged says why."""


class AdminServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket
        self._closing = asyncio.Event()
        self._serving = False

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Create, secure and listen on the socket; raises :class:`AdminSocketError`."""
        try:
            self._make_directory()
            self._remove_stale()
            self._sock = self._bind()
        except AdminSocketError:
            raise
        except OSError as exc:
            log.error("admin_socket_failed", extra={"path": str(self.path), "error": str(exc)})
            raise AdminSocketError(str(exc)) from exc

    async def run(self, controls: Controls) -> None:
        """Answer requests until :meth:`stop` (or cancellation); then remove the socket."""
        assert self._sock is not None, "start() first"
        sock = self._sock
        self._serving = True
        daemon = controls.config().daemon
        log.info(
            "admin_listening",
            extra={
                "path": str(self.path),
                "mode": f"{SOCKET_MODE:04o}",
                "viewer_group": daemon.admin_viewer_group,
                "operator_group": daemon.admin_operator_group,
            },
        )
        exchanges: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.TaskGroup() as group:
                accepting = group.create_task(
                    self._accept(sock, group, exchanges, controls), name="admin:accept"
                )
                await self._closing.wait()
                accepting.cancel()
                self._remove_socket()
                if exchanges:
                    await asyncio.wait(set(exchanges), timeout=_CLOSE_GRACE_SECONDS)
                for task in exchanges:
                    task.cancel()
        finally:
            self._remove_socket()
            log.info("admin_closed", extra={"path": str(self.path)})

    def stop(self) -> None:
        """Stop accepting; :meth:`run` lets exchanges answer, then returns.

        Safe to call at any point, also when :meth:`run` never ran (start-up failed).
        """
        self._closing.set()
        if not self._serving:
            self._remove_socket()

    # --- setting up --------------------------------------------------------------------

    def _make_directory(self) -> None:
        directory = self.path.parent
        if directory.is_dir():
            return  # systemd's RuntimeDirectory=, or the operator's: their mode stands
        directory.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
        os.chmod(directory, DIRECTORY_MODE)  # mkdir's mode went through the umask

    def _remove_stale(self) -> None:
        try:
            found = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(found.st_mode):
            log.error(
                "admin_socket_failed",
                extra={"path": str(self.path), "error": "the path exists and is not a socket"},
            )
            raise AdminSocketError(f"{self.path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(_PROBE_SECONDS)
            try:
                probe.connect(str(self.path))
            except ConnectionRefusedError:
                pass  # nobody listens: a leftover of a daemon that did not stop cleanly
            except FileNotFoundError:
                return
            except TimeoutError:
                self._in_use("a process listens on it but did not accept within 1 s")
            else:
                self._in_use("another daemon answers on it")
        os.unlink(self.path)
        log.warning("admin_stale_socket_removed", extra={"path": str(self.path)})

    def _in_use(self, detail: str) -> None:
        log.error("admin_socket_in_use", extra={"path": str(self.path), "detail": detail})
        raise AdminSocketError(f"{self.path}: {detail}; is dbsync already running?")

    def _bind(self) -> socket.socket:
        # Bound under a temporary name and set 0660 before it appears at its path;
        # link() then fails rather than replace a socket another daemon just made.
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(temporary))
            try:
                os.chmod(temporary, SOCKET_MODE)
                os.link(temporary, self.path)
            finally:
                os.unlink(temporary)
            found = os.stat(self.path)
            self._identity = (found.st_dev, found.st_ino)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EEXIST:
                self._in_use("another daemon created it while this one started")
            raise
        return sock

    def _remove_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._identity is None:
            return
        identity, self._identity = self._identity, None
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return
        if (found.st_dev, found.st_ino) == identity:  # not one a newer daemon made
            os.unlink(self.path)

    # --- exchanges -----------------------------------------------------------------------

    async def _accept(
        self,
        sock: socket.socket,
        group: asyncio.TaskGroup,
        exchanges: set[asyncio.Task[None]],
        controls: Controls,
    ) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                connection, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue  # the client gave up before we got to it
                if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                    raise
                # Out of descriptors or memory (a flood elsewhere in the process): the
                # caller waits in the backlog. Log the episode once, back off, go on.
                if not failures:
                    log.warning(
                        "admin_accept_failed",
                        extra={"path": str(self.path), "error": os.strerror(exc.errno or 0)},
                    )
                failures += 1
                await asyncio.sleep(min(_ACCEPT_BACKOFF_MAX_SECONDS, 0.05 * 2**failures))
                continue
            if failures:
                log.info(
                    "admin_accept_recovered", extra={"path": str(self.path), "failures": failures}
                )
                failures = 0
            task = group.create_task(self._exchange(connection, controls), name="admin:exchange")
            exchanges.add(task)
            task.add_done_callback(exchanges.discard)

    async def _exchange(self, connection: socket.socket, controls: Controls) -> None:
        # An exchange that fails must not take the server (or the daemon) with it.
        try:
            await self._exchange_once(connection, controls)
        except Exception as exc:
            log.exception("admin_exchange_failed", extra={"error": describe(exc)})

    async def _exchange_once(self, connection: socket.socket, controls: Controls) -> None:
        loop = asyncio.get_running_loop()
        with connection:
            connection.setblocking(False)
            peer = peer_of(connection)
            try:
                async with asyncio.timeout(_READ_SECONDS):
                    line = await _read_line(loop, connection)
            except TimeoutError:
                log.debug("admin_client_silent", extra={"uid": peer.uid, "pid": peer.pid})
                return
            except ConnectionError:
                return
            if not line:
                return  # connected and went away: a probe (see _remove_stale)
            reply = await self._answer(line, peer, controls)
            try:
                async with asyncio.timeout(_WRITE_SECONDS):
                    await loop.sock_sendall(connection, encode(reply))
            except (TimeoutError, ConnectionError) as exc:
                log.warning(
                    "admin_reply_lost",
                    extra={"uid": peer.uid, "pid": peer.pid, "error": repr(exc)},
                )

    async def _answer(self, line: bytes, peer: Peer, controls: Controls) -> Reply:
        try:
            request = decode_request(line)
        except msgspec.DecodeError as exc:
            log.warning(
                "admin_bad_request", extra={"uid": peer.uid, "pid": peer.pid, "error": str(exc)}
            )
            return Fault(code=FaultCode.BAD_REQUEST, message=str(exc))
        verb = request.__struct_config__.tag
        fields = {
            "verb": verb,
            "uid": peer.uid,
            "pid": peer.pid,
            "audience": getattr(request, "audience", None),
        }
        daemon = controls.config().daemon
        access = Access(
            daemon_uid=os.geteuid(),
            viewer_group=daemon.admin_viewer_group,
            operator_group=daemon.admin_operator_group,
        )
        role = await asyncio.to_thread(access.role_of, peer)
        if role < request.role:
            log.warning("admin_command", extra={**fields, "outcome": FaultCode.PERMISSION_DENIED})
            return Fault(
                code=FaultCode.PERMISSION_DENIED,
                message=f"uid {peer.uid} may not {verb}: it needs the"
                f" {request.role.name.lower()} role (admin_{request.role.name.lower()}_group"
                " in [daemon])",
            )
        started = asyncio.get_running_loop().time()
        reply: Reply
        try:
            reply = await perform(controls, request)
        except AdminFault as fault:
            reply = Fault(code=fault.code, message=fault.message)
        except Exception as exc:
            log.exception("admin_command_failed", extra={**fields, "error": describe(exc)})
            reply = Fault(code=FaultCode.INTERNAL, message="the daemon failed; its log says why")
        if request.role is Role.OPERATOR:
            outcome = reply.code if isinstance(reply, Fault) else "ok"
            seconds = round(asyncio.get_running_loop().time() - started, 3)
            extra = {**fields, "outcome": outcome, "seconds": seconds}
            if isinstance(reply, Fault):
                log.warning("admin_command", extra={**extra, "detail": reply.message})
            else:
                log.info("admin_command", extra=extra)
        return reply


async def _read_line(loop: asyncio.AbstractEventLoop, connection: socket.socket) -> bytes:
    """The first line (without its newline), or all that came before EOF; b"" for none."""
    data = bytearray()
    while b"\n" not in data:
        chunk = await loop.sock_recv(connection, 65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            break  # decoding the truncated line fails: bad_request
    return bytes(data.split(b"\n", 1)[0])
