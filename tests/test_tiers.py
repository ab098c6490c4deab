"""The two test tiers: what marks a test integration, and the guard that fails a unit test starting a process."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess

import pytest

from tests.helpers.processes import ProcessGuard, ProcessStartRefused, uvloop

pytest_plugins = ["pytester"]

# The inner sessions run in this process, under this run's own guard: they must start nothing themselves.
INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\nmarkers = integration: starts real processes\n"
CONFTEST = """
from tests.conftest import (
    no_p2pd_left_behind, pytest_collection_modifyitems, pytest_runtest_call, pytest_runtest_setup,
    pytest_runtest_teardown, real_processes,
)
"""


def test_the_guard_refuses_every_way_to_start_a_process_and_remembers_each() -> None:
    def current() -> tuple[object, ...]:  # what runs now (this test's own run refuses starts too, outside)
        loop = (uvloop.Loop.subprocess_exec, uvloop.Loop.subprocess_shell) if uvloop is not None else ()
        return (subprocess.Popen._execute_child, multiprocessing.process.BaseProcess.start, os.fork, *loop)

    before = current()
    guard = ProcessGuard()
    with guard.refusing() as attempts:
        with pytest.raises(ProcessStartRefused):
            subprocess.run(["true"], check=False)
        try:  # swallowed, as code under test might: still remembered
            multiprocessing.get_context("spawn").Process(target=print).start()
        except ProcessStartRefused:
            pass
        with pytest.raises(ProcessStartRefused):
            os.fork()
        with pytest.raises(ProcessStartRefused):
            asyncio.run(asyncio.create_subprocess_exec("true"))
        if uvloop is not None:
            with pytest.raises(ProcessStartRefused):
                uvloop.run(asyncio.create_subprocess_exec("true"))
    assert len(attempts) == 4 + (uvloop is not None)
    assert attempts[0] == "subprocess true" and attempts[1] == "multiprocessing Process.start"
    assert current() == before


def test_a_test_is_integration_exactly_when_it_uses_real_processes(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def peer(real_processes):
            return "peer"

        def test_direct(real_processes): pass
        def test_through_a_fixture(peer): pass
        @pytest.mark.usefixtures("real_processes")
        def test_declared(): pass
        def test_pure(): pass
        """
    )
    result = pytester.runpytest("--collect-only", "-q", "-m", "integration")
    result.stdout.fnmatch_lines(["*3/4 tests collected (1 deselected)*"])
    assert "test_pure" not in result.stdout.str()


def test_a_hand_written_integration_marker_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile("import pytest\n\n@pytest.mark.integration\ndef test_marked(): pass\n")
    result = pytester.runpytest("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*integration follows from `real_processes`, not by hand*"])


def test_a_unit_test_that_starts_a_process_fails_even_if_it_swallows_the_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import subprocess

        def test_sneaky():
            try:
                subprocess.run(["true"])
            except Exception:
                pass
        """
    )
    result = pytester.runpytest("-q")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*is a unit test but tried to start a process*", "*subprocess true*"])
