"""Shared test rules: an async test must not leave tasks running behind it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio


@pytest_asyncio.fixture
async def _no_leaked_tasks() -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()

    def running() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if t is not current and not t.done()]

    # Tasks cancelled during teardown need a few turns of the loop to finish.
    for _ in range(20):
        if not running():
            return
        await asyncio.sleep(0)
    leaked = sorted(t.get_name() for t in running())
    pytest.fail(f"the test left tasks running: {leaked}")


@pytest.fixture(autouse=True)
def _async_tests_leave_no_tasks(request: pytest.FixtureRequest) -> None:
    # Requested first, so that it is torn down last, after the test's own fixtures.
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        request.getfixturevalue("_no_leaked_tasks")


@pytest.fixture
def private_dev_credentials() -> None:
    """dev/credentials as a checkout needs them: readable by their owner only.

    dbsync refuses a secret file others can read, and git keeps no mode but the
    executable bit, so a fresh clone has them 0644 (README: chmod 600 once).
    """
    for secret in (Path(__file__).resolve().parents[1] / "dev" / "credentials").iterdir():
        secret.chmod(0o600)
