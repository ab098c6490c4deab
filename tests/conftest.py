"""Fixtures and hooks: the two tiers, the guard that keeps unit tests from starting processes, the p2pd leak check.

A test is ``integration`` exactly when it uses the :func:`real_processes` fixture, directly or through another fixture
(``pytest -m "not integration"`` is the fast unit tier). Any other test that starts a process fails, in every
run, so a test that forgets to ask for ``real_processes`` cannot hide in the unit tier.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Generator, Iterator

import pytest

from tests.helpers.processes import ProcessGuard, cmdline, descendants, p2pd_pids

_PR_SET_CHILD_SUBREAPER = 36
_REAL_PROCESSES = "real_processes"


def pytest_configure(config: pytest.Config) -> None:
    # Orphans of processes the tests start (a SIGKILLed peer's p2pd) are re-parented to this process
    # instead of init, so "descendants of the test process" is exactly what the tests started, and
    # daemons of anything else running on the machine are never counted (or killed) as leaks.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.fixture(scope="session")
def real_processes() -> None:
    """Declares that a test starts real processes: p2pd daemons, CLI runs, worker processes.

    Using it (or a fixture that uses it) is what marks a test ``integration``; without it the test may start
    none. Session-scoped so that module-scoped fixtures starting peers can depend on it too.
    """


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Runs before the -m selection (ours is a conftest hook, the selection a plugin's), so the marker set here
    # is the one `-m "not integration"` deselects on.
    for item in items:
        uses = _REAL_PROCESSES in getattr(item, "fixturenames", ())
        if uses:
            item.add_marker(pytest.mark.integration)
        elif item.get_closest_marker("integration") is not None:
            raise pytest.UsageError(f"{item.nodeid}: integration follows from `real_processes`, not by hand")


def _is_unit(item: pytest.Item) -> bool:
    return item.get_closest_marker("integration") is None


def _guarded(item: pytest.Item) -> Generator[None, object, object]:
    """Run one phase of ``item`` (setup, call or teardown) refusing process starts if it is a unit test."""
    if not _is_unit(item):
        return (yield)
    error: BaseException | None = None
    with ProcessGuard().refusing() as attempts:
        try:
            result = yield
        except BaseException as e:  # reported below, after the refused starts that likely caused it
            error = e
    if attempts:
        listed = "\n  ".join(attempts)
        pytest.fail(
            f"{item.nodeid} is a unit test but tried to start a process; give it the `real_processes` fixture "
            f"(which marks it integration). Refused:\n  {listed}",
            pytrace=False,
        )
    if error is not None:
        raise error
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    return (yield from _guarded(item))


@pytest.fixture(autouse=True)
def no_p2pd_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every p2pd that appears during a test must be gone shortly after it (checked by pid). A unit test may
    leave no new process at all, not even a zombie: the backstop to the guard, for starts that bypass it."""
    before = p2pd_pids()
    unit = _is_unit(request.node)
    before_any = descendants(zombies=True) if unit else set()
    yield
    deadline = time.monotonic() + 5
    while (left := p2pd_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = descendants(zombies=True) - before_any - left if unit else set()
    described = {pid: cmdline(pid) for pid in left | started}
    for pid in left | started:  # do not poison the following tests, but fail this one
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"p2pd processes left running after the test: {described}"
    assert not started, f"a unit test started processes (give it the `real_processes` fixture): {described}"
