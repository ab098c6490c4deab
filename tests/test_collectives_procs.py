"""Collective rounds between separate processes: exact results for every group size, both data planes,
and faults acted out for real (SIGKILL of a member process, a stall, garbage) at every named phase."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from legion_swarm.collectives.faults import KINDS, PHASES
from legion_swarm.collectives.partition import plan_partition
from legion_swarm.collectives.reference import reference_all_reduce, weighted_average
from legion_swarm.collectives.worker import LR, WorkerProcess, make_inputs, make_params

pytestmark = pytest.mark.usefixtures("real_processes")

SIZES = [20000, 0, 777, 5003]
CONFIG = {
    "chunk_elems": 4096, "connect_timeout_s": 1.5, "reduce_timeout_s": 8.0, "gather_timeout_s": 8.0,
    "commit_timeout_s": 3.0, "stall_timeout_s": 1.5,
}  # fmt: skip


def spawn(n: int, **kwargs: Any) -> list[WorkerProcess]:
    workers = [WorkerProcess(**kwargs) for _ in range(n)]  # they import torch in parallel
    try:
        for w in workers:
            w.ready()
    except BaseException:
        for w in workers:
            w.proc.kill()
            w.close()
        raise
    return workers


def close_all(workers: list[WorkerProcess]) -> None:
    for w in workers:
        w.close()


def job(workers: list[WorkerProcess], **fields: Any) -> dict[str, Any]:
    spec = {
        "members": [w.member for w in workers], "round_id": os.urandom(8).hex(), "config": CONFIG,
        "op": "all_reduce", "sizes": SIZES, "seed": 1, "weight": 1.0, "rounds": 1, "fault": None, "save": None,
    }  # fmt: skip
    spec.update(fields)
    return spec


def run(workers: list[WorkerProcess], jobs: list[dict[str, Any]], timeout: float = 60) -> list[dict[str, Any]]:
    for w, j in zip(workers, jobs, strict=True):
        w.submit(j)
    return [w.read(timeout) for w in workers]


def weights_of(n: int) -> list[float]:
    return [1.0 + r for r in range(n)]


@pytest.mark.parametrize("n_members", [1, 2, 3, 4, 7])
def test_processes_all_reduce_exactly(n_members: int, tmp_path: Path) -> None:
    workers = spawn(n_members)
    try:
        base = job(workers, seed=n_members)
        weights = weights_of(n_members)
        jobs = [{**base, "weight": weights[r], "save": str(tmp_path / f"{r}.pt")} for r in range(n_members)]
        reports = run(workers, jobs)
    finally:
        close_all(workers)
    expected = reference_all_reduce([make_inputs(SIZES, n_members, r) for r in range(n_members)], weights_of(n_members))
    for r, report in enumerate(reports):
        assert report["rank"] == r and report["missing_shards"] == [] and report["excluded"] == {}
        assert all(c == list(range(n_members)) for c in report["contributors"].values())
        for got, want in zip(torch.load(tmp_path / f"{r}.pt"), expected, strict=True):
            assert torch.equal(got, want)


def test_barrier_jobs_wait_for_release_before_each_round() -> None:
    workers = spawn(2)
    try:
        spec = job(workers, rounds=2, barrier=True)
        for w in workers:
            w.submit(spec)
        for index in range(2):
            assert [w.read(30) for w in workers] == [{"round": index, "rank": r, "barrier": True} for r in range(2)]
            with pytest.raises(TimeoutError):  # nobody starts a round before the parent says so
                workers[0].read(1.0)
            for w in workers:
                w.release()
            reports = [w.read(30) for w in workers]
            assert [(r["round"], r["missing_shards"]) for r in reports] == [(index, []), (index, [])]
    finally:
        close_all(workers)


@pytest.mark.parametrize("plane", ["libp2p", "auto"])
def test_processes_over_libp2p_streams(plane: str, tmp_path: Path) -> None:
    """``libp2p``: p2pd streams only. ``auto`` with one member serving no direct endpoint: the pairs with it
    fall back to libp2p, the others go direct."""
    n_members = 3
    workers = spawn(2, libp2p=True) + spawn(1, libp2p=True, direct=plane == "libp2p")
    try:
        base = job(workers, config={**CONFIG, "plane": plane, "codec": "fp16"}, seed=5)
        jobs = [{**base, "save": str(tmp_path / f"{r}.pt")} for r in range(n_members)]
        reports = run(workers, jobs)
    finally:
        close_all(workers)
    outputs = [torch.load(tmp_path / f"{r}.pt") for r in range(n_members)]
    for r, report in enumerate(reports):
        assert report["missing_shards"] == [] and report["excluded"] == {}
        for a, b in zip(outputs[r], outputs[0], strict=True):
            assert torch.equal(a, b)
    if plane == "libp2p":
        assert all(set(rep["planes"].values()) == {"libp2p"} for rep in reports)
    else:
        assert reports[0]["planes"] == {"1": "direct", "2": "libp2p"}
        assert reports[2]["planes"] == {"0": "libp2p", "1": "libp2p"}
    inputs = [make_inputs(SIZES, 5, r) for r in range(n_members)]
    expected = reference_all_reduce(inputs, [1.0] * n_members)
    for t, (got, want) in enumerate(zip(outputs[0], expected, strict=True)):
        # fp16 rounds each contribution and then the result: |error| <= mean(|x_r|) 2^-11 + |avg| 2^-11 (+ a floor)
        contributions = torch.stack([inputs[r][t].abs() for r in range(n_members)]).mean(0)
        bound = (contributions + want.abs()) * 2.0**-11 * 1.01 + 2.0**-24
        assert bool(((got - want).abs() <= bound).all())


# ------------------------------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def pool() -> Iterator[list[WorkerProcess]]:
    """Four workers shared by the fault tests; a test that kills one replaces it."""
    workers = spawn(4)
    yield workers
    close_all(workers)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("phase", PHASES)
def test_process_faults_leave_survivors_identical(
    pool: list[WorkerProcess], phase: str, kind: str, tmp_path: Path
) -> None:
    n_members, faulty = 4, 1
    for i, w in enumerate(pool):  # replace workers killed by an earlier test
        if w.proc.poll() is not None:
            w.close()
            pool[i] = spawn(1)[0]
    weights = weights_of(n_members)
    seed = 10 + PHASES.index(phase)
    base = job(pool, op="sharded_step", seed=seed)
    jobs = [{**base, "weight": weights[r], "save": str(tmp_path / f"{r}.pt")} for r in range(n_members)]
    jobs[faulty]["fault"] = {"phase": phase, "kind": kind, "seed": 3}
    jobs[faulty]["save"] = None
    for w, j in zip(pool, jobs, strict=True):
        w.submit(j)
    survivors = [r for r in range(n_members) if r != faulty]
    round_timeout = CONFIG["connect_timeout_s"] + CONFIG["reduce_timeout_s"] + CONFIG["gather_timeout_s"]
    round_timeout += CONFIG["commit_timeout_s"]
    reports = {r: pool[r].read(round_timeout + 5) for r in survivors}
    if kind == "kill":
        assert pool[faulty].proc.wait(10) == -9
    elif kind == "stall":
        pool[faulty].proc.kill()  # it would sit out its own round deadline; the next test replaces it
        pool[faulty].proc.wait()
    else:
        assert "error" not in pool[faulty].read(round_timeout + 5)

    for r in survivors:
        report = reports[r]
        assert "error" not in report, report
        assert report["seconds"] < round_timeout
        assert report["missing_shards"] == report["faulty"] == [faulty]
        assert report["contributors"] == reports[survivors[0]]["contributors"]
    sent_everything = phase in ("after_reduce", "mid_all_gather")
    contributors = [r for r in range(n_members) if sent_everything or r != faulty]
    assert all(reports[survivors[0]]["contributors"][str(s)] == contributors for s in survivors)

    outputs = {r: torch.cat([t.reshape(-1) for t in torch.load(tmp_path / f"{r}.pt")]) for r in survivors}
    for r in survivors:
        assert torch.equal(outputs[r], outputs[survivors[0]])
    grads = [torch.cat([t.reshape(-1) for t in make_inputs(SIZES, seed, r)]) for r in range(n_members)]
    params0 = torch.cat([t.reshape(-1) for t in make_params(SIZES, seed)])
    plan = plan_partition(SIZES, n_members)
    for shard in range(n_members):
        start, end = plan.bounds[shard]
        got = outputs[survivors[0]][start:end]
        if shard == faulty:
            assert torch.equal(got, params0[start:end])
        else:
            averaged = weighted_average([(grads[r][start:end], weights[r]) for r in contributors])
            assert torch.equal(got, params0[start:end] - LR * averaged)
