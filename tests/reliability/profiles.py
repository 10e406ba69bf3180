"""Hypothesis profiles of the reliability suite: ``short`` (the default run) and ``long``.

``HYPOTHESIS_PROFILE=long`` selects the long form (README.md, "Tests"). The fuzz
modules import this module, which loads the profile, and mark their tests with
:data:`FUZZ_TIMEOUT_SECONDS`. No example database: the checkout is shared, and a
failure prints its reproducer (``@reproduce_failure``).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "short")
FUZZ_TIMEOUT_SECONDS = 3_600 if PROFILE == "long" else 60

_COMMON = {
    "deadline": None,  # requests to a real server: timing is not the property
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("short", max_examples=300, **_COMMON)
settings.register_profile("long", max_examples=20_000, **_COMMON)
settings.load_profile(PROFILE)
