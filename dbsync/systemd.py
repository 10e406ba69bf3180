"""sd_notify: tell systemd when the daemon is ready, reloading, stopping, and alive.

The protocol is a datagram of ``KEY=VALUE`` lines to the socket named by
``$NOTIFY_SOCKET`` (an ``@`` prefix means the abstract namespace). It is stable and
documented for independent reimplementation, so a few lines of stdlib replace a
dependency. Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing,
and a failure to send is never raised: the daemon must not die because systemd
could not be told something.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

from dbsync.clock import Clock

__all__ = ["notify", "reloading", "run_watchdog", "watchdog_interval"]

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=..."``); True if systemd got them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("sd_notify_failed", extra={"error": str(exc)})
        return False
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the monotonic timestamp systemd >= 253 expects."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for, in seconds, or None when unset."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None


async def run_watchdog(
    interval_seconds: float, healthy: Callable[[], Awaitable[str]], clock: Clock
) -> None:
    """Send ``WATCHDOG=1`` every ``interval_seconds`` while ``healthy()`` finds nothing wrong.

    The pings come from the event loop itself, so a loop blocked by a runaway
    computation stops them too. ``healthy`` returns "" when all is well, else what is
    wrong: the ping is then withheld (and the reason logged once per change), so that
    systemd restarts a daemon that runs but can no longer do its job. A ``healthy``
    that raises, or a ping that cannot be sent (:func:`notify` never raises), withholds
    one ping and no more. Runs until cancelled.
    """
    withheld = ""
    while True:
        await clock.sleep(interval_seconds)
        try:
            problem = await healthy()
        except Exception as exc:
            # A check that fails (out of descriptors, say) is a reason to withhold the
            # ping, never to end the loop: systemd then decides, as it should.
            problem = f"the health check failed: {type(exc).__name__}: {exc}"
        if not problem:
            notify("WATCHDOG=1")
        elif problem != withheld:
            log.error("watchdog_withheld", extra={"reason": problem})
        withheld = problem
