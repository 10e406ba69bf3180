"""Exit codes shared by every command (INTERFACES.md), from sysexits where one fits."""

from __future__ import annotations

import enum

__all__ = ["ExitCode"]


class ExitCode(enum.IntEnum):
    OK = 0
    FAULT = 1  # the daemon answered with a fault, or the daemon itself failed
    USAGE = 2
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the daemon is not reachable
    TEMPFAIL = 75  # EX_TEMPFAIL: timed out
    NOPERM = 77  # EX_NOPERM: permission denied
    CONFIG = 78  # EX_CONFIG: the configuration is invalid
