"""A collectives worker process: one group member driven over stdin/stdout, for multi-process tests and
``benchmarks/bench_collectives.py``.

::

    python -m legion_swarm.collectives.worker [--libp2p]

On start it prints one JSON line describing itself (``peer_id``, ``direct`` endpoint, ``maddrs`` of its
libp2p host if ``--libp2p``). It then reads one JSON *job* per stdin line and answers with one JSON line per
round, until stdin closes. A job::

    {"members": [{"peer_id", "direct", "maddrs"}...], "round_id": hex, "config": {CollectiveConfig fields},
     "op": "all_reduce" | "sharded_step", "sizes": [numel...], "seed": int, "weight": float, "rounds": int,
     "fault": {"phase", "kind", "seed"} | null, "save": path | null, "barrier": bool (optional)}

With ``barrier``, before each round the worker prints ``{"round", "rank", "barrier": true}`` and waits for one
line on stdin (:meth:`WorkerProcess.release`), so a parent can start every member's round at the same moment.

Inputs are generated from ``seed`` and the member's rank (:func:`make_inputs`), so the parent can compute
the expected result itself. ``sharded_step`` does one SGD step (lr :data:`LR`) of parameters that are the
same on every member (:func:`make_params`) with the inputs as gradients. ``save`` writes the output
tensors after the last round (``torch.save``, atomically).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

import torch
import uvloop

from legion_swarm.collectives import Collectives, RoundResult
from legion_swarm.collectives.faults import FaultPlan
from legion_swarm.config import CollectiveConfig, HostConfig
from legion_swarm.errors import LegionError
from legion_swarm.groups import GroupInfo, GroupMember
from legion_swarm.transport.dataplane import DataPlane
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import Identity

logger = logging.getLogger(__name__)

LR = 0.5


def make_inputs(sizes: list[int], seed: int, rank: int) -> list[torch.Tensor]:
    """Member ``rank``'s tensors (standard normal) for a job seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed * 1009 + rank)
    return [torch.randn(n, generator=gen) for n in sizes]


def make_params(sizes: list[int], seed: int) -> list[torch.Tensor]:
    """The parameters every member starts a ``sharded_step`` job from."""
    gen = torch.Generator().manual_seed(seed * 1009 + 7777)
    return [torch.randn(n, generator=gen) for n in sizes]


def _report(result: RoundResult, seconds: float, round_index: int) -> dict[str, Any]:
    return {
        "round": round_index,
        "rank": result.rank,
        "seconds": seconds,
        "committed": list(result.committed),
        "missing_shards": list(result.missing_shards),
        "faulty": list(result.faulty),
        "contributors": {str(k): list(v) for k, v in result.contributors.items()},
        "excluded": {str(k): v for k, v in result.excluded.items()},
        "planes": {str(k): v for k, v in result.planes.items()},
        "timings": result.timings,
    }


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _run_job(plane: DataPlane, job: dict[str, Any]) -> None:
    members = tuple(
        GroupMember(
            peer_id=m["peer_id"], direct=tuple(m["direct"]) if m.get("direct") else None, maddrs=tuple(m["maddrs"])
        )
        for m in job["members"]
    )
    config = CollectiveConfig(**job["config"])
    coll = Collectives(plane, config)
    base = GroupInfo(round_id=bytes.fromhex(job["round_id"]), members=members)
    rank = base.rank_of(plane.identity.peer_id)
    sizes, seed = list(job["sizes"]), int(job["seed"])
    fault = FaultPlan(**job["fault"]) if job.get("fault") else None
    inputs = make_inputs(sizes, seed, rank)
    params = make_params(sizes, seed) if job["op"] == "sharded_step" else None

    def sgd(shard: int, averaged: torch.Tensor) -> torch.Tensor:
        assert params is not None and coll.last_plan is not None
        return coll.last_plan.extract(params, shard) - LR * averaged

    rounds = int(job.get("rounds", 1))
    work = [t.clone() for t in inputs] if params is None else inputs
    for index in range(rounds):
        group = GroupInfo(round_id=base.round_id + index.to_bytes(4, "big"), members=members)
        if params is None and index:
            for w, t in zip(work, inputs, strict=True):  # fresh inputs without fresh memory (page faults)
                w.copy_(t)
        if job.get("barrier"):  # start together, as gloo's dist.barrier() makes its ranks do
            _emit({"round": index, "rank": rank, "barrier": True})
            if not await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline):
                return
        started = time.perf_counter()
        try:
            if params is None:
                result = await coll.all_reduce(group, work, weight=job["weight"], faults=fault)
            else:
                result = await coll.sharded_step(group, work, sgd, out=params, weight=job["weight"], faults=fault)
        except LegionError as e:
            _emit({"round": index, "rank": rank, "error": repr(e)})
            continue
        seconds = time.perf_counter() - started
        if index == rounds - 1 and job.get("save"):  # saved before the report: a reader may load it at once
            tmp = f"{job['save']}.tmp"
            torch.save([t.clone() for t in (params if params is not None else work)], tmp)
            os.replace(tmp, job["save"])
        _emit(_report(result, seconds, index))


async def _serve(args: argparse.Namespace) -> None:
    identity = Identity.generate()
    async with contextlib.AsyncExitStack() as stack:
        host = None
        if args.libp2p:
            host = await Host.create(HostConfig(host="127.0.0.1", port=0), identity)
            stack.push_async_callback(host.aclose)
        plane = await DataPlane.create(identity, host=host, listen=None if args.no_direct else "127.0.0.1")
        stack.push_async_callback(plane.aclose)
        maddrs = await host.maddrs() if host is not None else []
        _emit({"peer_id": identity.peer_id, "direct": plane.endpoint, "maddrs": maddrs, "pid": os.getpid()})
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            await _run_job(plane, json.loads(line))


class WorkerProcess:
    """The parent's handle on one worker process (synchronous: tests and benchmarks drive several at once).

    Lines from the worker's stdout are read by a thread into a queue, so reads can time out."""

    def __init__(self, *, libp2p: bool = False, direct: bool = True, log_level: str = "WARNING") -> None:
        cmd = [sys.executable, "-m", "legion_swarm.collectives.worker", "--log-level", log_level]
        cmd += ["--libp2p"] * libp2p + ["--no-direct"] * (not direct)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.info: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the worker's self-description (``peer_id``, ``direct``, ``maddrs``, ``pid``)."""
        self.info = self.read(timeout)
        return self.info

    @property
    def member(self) -> dict[str, Any]:
        return {k: self.info[k] for k in ("peer_id", "direct", "maddrs")}

    def submit(self, job: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def release(self) -> None:
        """Let a worker waiting at a ``barrier`` start its round."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line; TimeoutError if none within ``timeout`` s, EOFError if the worker exited."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"worker {self.proc.pid} said nothing for {timeout} s") from None
        if line is None:
            self._lines.put(None)
            raise EOFError(f"worker {self.proc.pid} exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self, timeout: float = 10.0) -> None:
        """Close stdin (the worker finishes its job and exits); kill it if it does not exit in time."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libp2p", action="store_true", help="start a p2pd host for the libp2p-stream plane")
    parser.add_argument("--no-direct", action="store_true", help="serve no direct-TCP endpoint")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    # Workers share the machine's cores with each other: one intra-op thread each, or torch's OpenMP
    # threads spin against the other members' (a parallel op then costs a scheduler time slice).
    torch.set_num_threads(1)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(args))  # as the CLI: its transports read straight into our buffers


if __name__ == "__main__":
    main()
