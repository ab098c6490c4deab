"""The compute thread: runs off the event loop, one call at a time, at the CPU priority asked for."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from legion_swarm.train.compute import Compute, thread_nice


async def test_compute_runs_on_one_lower_priority_thread_and_leaves_the_loop_alone() -> None:
    base = thread_nice()
    compute = Compute(nice=min(19, base + 7))
    try:
        seen = await asyncio.gather(*(compute.run(lambda: (threading.get_ident(), thread_nice())) for _ in range(4)))
        assert len({ident for ident, _ in seen}) == 1 and seen[0][0] != threading.get_ident()
        assert {nice for _, nice in seen} == {min(19, base + 7)}
        assert thread_nice() == base  # the event loop's thread (and the process) keep their priority
        assert os.getpriority(os.PRIO_PROCESS, 0) == base
    finally:
        compute.close()


async def test_compute_passes_arguments_and_errors_through() -> None:
    compute = Compute()
    try:
        assert await compute.run(divmod, 17, 5) == (3, 2)
        with pytest.raises(ZeroDivisionError):
            await compute.run(divmod, 1, 0)
    finally:
        compute.close()


def test_a_nice_value_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"0\.\.19"):
        Compute(nice=20)
