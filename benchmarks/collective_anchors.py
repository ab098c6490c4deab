"""Anchor measurements for the collectives benchmark: gloo all-reduce and hivemind's averager.

Our own collectives are only meaningful next to numbers measured on the same machine, at the
same moment, for the same data. This module gives two such anchors, each run in ``n_procs``
separate processes on 127.0.0.1 with one float32 tensor of ``numel`` elements per process:

* ``gloo_allreduce_seconds`` — ``torch.distributed`` with the gloo backend, ``all_reduce`` (SUM).
  The lower bound of what a tuned, non-fault-tolerant ring over TCP achieves here.
* ``hivemind_averager_seconds`` — hivemind 1.1.12 ``DecentralizedAverager.step()``, matchmaking
  over its DHT included, no compression or ``compression="fp16"`` (its ``Float16Compression``; its 8-bit
  codecs break on numpy 2.4). The decentralized baseline we must beat.

Each: one warm-up, then ``repeats`` timed steps; every step starts behind a barrier, is timed on
each rank, and counts as the slowest rank's time; the result is the median over the steps. Every
step is verified against the inputs (strided sample of elements plus float64 sums) so that a step
that "succeeds" without reducing anything is reported as failed, not timed.

Every rank process makes itself a process-group leader, so everything it starts (hivemind's DHT and
averager processes, the ``p2pd`` daemon) can be killed as one group, even if the rank dies first.

    python benchmarks/collective_anchors.py                              # 4 procs x 25 M floats
    python benchmarks/collective_anchors.py --numel 1000000 --only gloo
    python benchmarks/collective_anchors.py --only hivemind --compression fp16

Prints one JSON object on stdout: ``{"gloo_s": ..., "hivemind_s": ..., "numel": ..., "procs": ...}``
(plus ``repeats`` and ``hivemind_failed_steps``); logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_ready
from multiprocessing.synchronize import Barrier
from typing import Any, Literal

import numpy as np

logger = logging.getLogger("collective_anchors")

# Spawn, not fork: ranks must not inherit the parent's threads, torch state or event loops.
_CTX = mp.get_context("spawn")

SAMPLE_POINTS = 4096  # elements checked exactly per step; stride hits every 512 KiB hivemind part at 25 M
BASE_SEED = 1234
SETUP_TIMEOUT_S = 180.0  # imports + DHT bootstrap + averager start, on a loaded 2-core box
STEP_TIMEOUT_S = 120.0  # one step, matchmaking and all-reduce included, generous for 100 MB
# hivemind matchmaking. With target_group_size == n_procs the leader assembles the group as soon as
# the last follower joins, so min_matchmaking_time is only an upper bound on waiting, not a delay.
# request_timeout must stay below it (hivemind warns otherwise: leaders can deadlock on each other).
HIVEMIND_MIN_MATCHMAKING_S = 5.0
HIVEMIND_REQUEST_TIMEOUT_S = 3.0

Message = tuple[str, int, Any]  # (kind, rank, payload) sent from a rank to the parent
Compression = Literal["none", "fp16"]  # what hivemind's averager sends: float32, or its Float16Compression


@dataclass
class AnchorResult:
    """Everything one anchor run measured, for callers that want more than the median."""

    name: str
    procs: int
    numel: int
    step_seconds: list[float] = field(default_factory=list)  # max over ranks, verified timed steps only
    failed_steps: list[str] = field(default_factory=list)  # one description per failed timed step
    warmup_seconds: float | None = None
    warmup_error: str | None = None
    matchmaking_seconds: list[float] = field(default_factory=list)  # hivemind only: max over ranks

    @property
    def median_s(self) -> float:
        """Median of the verified timed steps; raises if none succeeded (a number would be a lie)."""
        if not self.step_seconds:
            raise RuntimeError(f"{self.name}: no timed step succeeded: {self.failed_steps}")
        return statistics.median(self.step_seconds)


# --------------------------------------------------------------------------------------------
# Rank side (runs in the spawned processes)
# --------------------------------------------------------------------------------------------


def _sample_indices(numel: int) -> Any:
    """Evenly strided indices over the whole tensor, so every chunk of a partitioned reduce is hit."""
    import torch

    count = min(numel, SAMPLE_POINTS)
    # Integer arithmetic: a float32 linspace rounds numel - 1 up to numel at 25 M elements.
    return torch.arange(count, dtype=torch.int64) * (numel - 1) // max(count - 1, 1)


def _snapshot(tensor: Any, indices: Any) -> dict[str, Any]:
    """What the parent needs to verify a reduction: exact sampled values and float64 sums."""
    import torch

    return {
        "sample": tensor[indices].double().numpy(),
        "total": float(tensor.sum(dtype=torch.float64)),
        "l1": float(tensor.abs().sum(dtype=torch.float64)),
    }


def _exit_on_signal(signum: int, frame: Any) -> None:
    """In a rank, SIGTERM unwinds the stack so that ``finally`` shuts hivemind's processes down."""
    raise SystemExit(128 + signum)


def _rank_main(
    body: Callable[[int, Connection, Barrier, dict[str, Any]], None],
    rank: int,
    conn: Connection,
    barrier: Barrier,
    params: dict[str, Any],
) -> None:
    """Entry point of every rank: isolate it, run ``body``, report any exception to the parent."""
    # Own process group: the parent can kill this rank and all its descendants (p2pd included) at
    # once, and a Ctrl+C in the terminal reaches only the parent, which then cleans up in order.
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    # The parent's stdout carries exactly one JSON object; nothing below may write to it.
    os.dup2(2, 1)
    try:
        body(rank, conn, barrier, params)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", rank, traceback.format_exc()))
        raise
    finally:
        conn.close()


def _gloo_rank(rank: int, conn: Connection, barrier: Barrier, params: dict[str, Any]) -> None:
    """One gloo rank: warm-up + timed all_reduce(SUM), each behind a ``dist.barrier``."""
    # Gloo otherwise picks the interface the hostname resolves to; we must stay on loopback.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist

    n, numel = params["n_procs"], params["numel"]
    dist.init_process_group(
        backend="gloo",
        init_method=f"tcp://127.0.0.1:{params['port']}",
        rank=rank,
        world_size=n,
        timeout=timedelta(seconds=STEP_TIMEOUT_S),
    )
    try:
        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(BASE_SEED + rank))
        indices = _sample_indices(numel)
        records = []
        for _ in range(params["repeats"] + 1):
            # A rank-specific shift keeps the inputs distinct from step to step, so that every step
            # has something to reduce and a no-op would show up in the verification.
            tensor.add_(float(rank + 1))
            pre = _snapshot(tensor, indices)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            seconds = time.perf_counter() - t0
            records.append({"seconds": seconds, "error": None, "pre": pre, "post": _snapshot(tensor, indices)})
        conn.send(("result", rank, records))
    finally:
        dist.destroy_process_group()


def _hivemind_rank(rank: int, conn: Connection, barrier: Barrier, params: dict[str, Any]) -> None:
    """One hivemind peer: its own DHT process + DecentralizedAverager, steps started on a barrier."""
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage
    from hivemind.compression import Float16Compression, NoCompression

    # A spawned process inherits "spawn" as its default start method, but DecentralizedAverager is a
    # plain mp.Process holding unpicklable state: hivemind assumes fork (its DHT forks explicitly).
    mp.set_start_method("fork", force=True)
    n, numel = params["n_procs"], params["numel"]
    dht: hivemind.DHT | None = None
    averager: hivemind.averaging.DecentralizedAverager | None = None
    try:
        if rank == 0:
            dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            conn.send(("broadcast", rank, [str(addr) for addr in dht.get_visible_maddrs()]))
        else:
            initial_peers = conn.recv()  # rank 0's addresses, relayed by the parent
            dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)

        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(BASE_SEED + rank))
        indices = _sample_indices(numel)
        averager = hivemind.averaging.DecentralizedAverager(
            [tensor],
            dht,
            start=True,
            prefix=params["prefix"],
            target_group_size=n,
            min_group_size=n,
            min_matchmaking_time=HIVEMIND_MIN_MATCHMAKING_S,
            request_timeout=HIVEMIND_REQUEST_TIMEOUT_S,
            allreduce_timeout=STEP_TIMEOUT_S,
            compression=Float16Compression() if params["compression"] == "fp16" else NoCompression(),
        )
        records = []
        for _ in range(params["repeats"] + 1):
            with averager.get_tensors() as (local,):
                local.add_(float(rank + 1))  # distinct inputs every step, see _gloo_rank
                pre = _snapshot(local, indices)
            barrier.wait(timeout=SETUP_TIMEOUT_S + STEP_TIMEOUT_S)
            error, matchmaking_s = None, None
            t0 = time.perf_counter()
            try:
                # wait=False only to watch the stage (group found -> all-reduce) from shared memory;
                # the wall time is still that of the whole synchronous step.
                control = averager.step(gather={"rank": rank}, timeout=STEP_TIMEOUT_S, wait=False)
                while not control.done():
                    if matchmaking_s is None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
                        matchmaking_s = time.perf_counter() - t0
                    time.sleep(0.002)
                gathered = control.result()
            except Exception as e:
                gathered, error = None, f"step raised {e!r}"
            seconds = time.perf_counter() - t0
            if error is None and gathered is None:
                error = "step returned None"
            elif error is None and sorted(info["rank"] for info in gathered.values()) != list(range(n)):
                error = f"group was not all {n} peers: {sorted(info['rank'] for info in gathered.values())}"
            with averager.get_tensors() as (local,):
                post = _snapshot(local, indices)
            records.append(
                {"seconds": seconds, "error": error, "pre": pre, "post": post, "matchmaking_s": matchmaking_s}
            )
        # Nobody may shut down while a peer could still be averaging with it.
        barrier.wait(timeout=SETUP_TIMEOUT_S + STEP_TIMEOUT_S)
        conn.send(("result", rank, records))
    finally:
        if averager is not None:
            averager.shutdown()
        if dht is not None:
            dht.shutdown()


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    """A port that was free a moment ago (bind to 0 and release it); racy but fine on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(pid: int | None, sig: signal.Signals) -> None:
    """Signal a rank's process group; a missing group (everything already gone) is fine."""
    if pid is None:
        return
    # The group exists only if the rank reached setpgid, so this never hits the parent's own group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _reap(procs: list[Any], graceful: bool) -> None:
    """Make sure no rank nor anything it started survives; ranks first get a chance to shut down.

    SIGTERM goes to the rank alone, which turns it into SystemExit and shuts its averager and DHT
    (hence p2pd) down itself; whatever is left after the grace period dies with its process group.
    """
    try:
        deadline = time.monotonic() + (30.0 if graceful else 0.0)
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(proc.is_alive() for proc in procs):
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            deadline = time.monotonic() + 10.0
            for proc in procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:  # also after a second Ctrl+C during the polite part
        # Sweep leftovers (a p2pd orphaned by a dead DHT process keeps the rank's process group).
        for proc in procs:
            _kill_group(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                logger.error("rank process %s did not exit after SIGKILL", proc.pid)


def _run_ranks(body: Callable[..., None], n_procs: int, params: dict[str, Any], timeout_s: float) -> list[Any]:
    """Run ``body`` in ``n_procs`` spawned ranks; return each rank's result payload, rank order.

    Relays ``broadcast`` messages to the other ranks; raises on the first rank error, on a rank
    that dies without a result, or on timeout. Always reaps all ranks and their descendants.
    """
    barrier = _CTX.Barrier(n_procs)
    procs, conns = [], []
    results: dict[int, Any] = {}
    ok = False
    try:
        for rank in range(n_procs):
            parent_end, child_end = _CTX.Pipe(duplex=True)
            proc = _CTX.Process(
                target=_rank_main, args=(body, rank, child_end, barrier, params), name=f"anchor-rank-{rank}"
            )
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        deadline = time.monotonic() + timeout_s

        def handle(rank: int, message: Message) -> None:
            kind, _, payload = message
            if kind == "error":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            if kind == "broadcast":
                for other, other_conn in enumerate(conns):
                    if other != rank:
                        other_conn.send(payload)
            elif kind == "result":
                results[rank] = payload

        while len(results) < n_procs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(n_procs)) - set(results))} timed out after {timeout_s}s")
            # Poll liveness instead of waiting for EOF or process sentinels: when a rank dies, the
            # processes hivemind forked from it still hold its pipe and sentinel fds open.
            pending = [rank for rank in range(n_procs) if rank not in results]
            wait_for_ready([conns[rank] for rank in pending], timeout=min(remaining, 0.5))
            for rank in pending:
                closed = False
                try:
                    while conns[rank].poll():
                        handle(rank, conns[rank].recv())
                except EOFError:
                    closed = True
                if rank not in results and (closed or not procs[rank].is_alive()):
                    procs[rank].join(timeout=1.0)
                    raise RuntimeError(f"rank {rank} ended without a result (exit code {procs[rank].exitcode})")
        ok = True
        return [results[rank] for rank in range(n_procs)]
    finally:
        _reap(procs, graceful=ok)
        for conn in conns:
            conn.close()


def _verify_step(records: list[dict[str, Any]], op: Literal["sum", "mean"], rel: float = 1e-6) -> str | None:
    """None if every rank ended the step holding the reduction of all ranks' inputs, else why not.

    ``rel``: the relative error allowed per input and rounding (1e-6 for float32, 1e-3 for a float16 wire)."""
    errors = [f"rank {rank}: {r['error']}" for rank, r in enumerate(records) if r.get("error")]
    if errors:
        return "; ".join(errors)
    pre = np.stack([r["pre"]["sample"] for r in records])
    expected = pre.sum(axis=0) if op == "sum" else pre.mean(axis=0)
    totals = [r["pre"]["total"] for r in records]
    expected_total = sum(totals) if op == "sum" else sum(totals) / len(totals)
    n = len(records)
    # float32 arithmetic: relative error ~1e-7 per element and per addition; allow 10x over n inputs.
    elem_atol = rel * n * float(np.abs(pre).max())
    total_atol = rel * n * max(r["pre"]["l1"] for r in records)
    for rank, r in enumerate(records):
        worst = float(np.abs(r["post"]["sample"] - expected).max())
        if worst > elem_atol:
            return f"rank {rank}: sampled elements off by up to {worst:.3g} (tolerance {elem_atol:.3g})"
        if abs(r["post"]["total"] - expected_total) > total_atol:
            return f"rank {rank}: sum {r['post']['total']:.6g} != expected {expected_total:.6g}"
    return None


def _summarize(
    name: str, n_procs: int, numel: int, per_rank: list[list[dict[str, Any]]], op: Literal["sum", "mean"],
    rel: float = 1e-6,
) -> AnchorResult:  # fmt: skip
    """Per step: max over ranks, verified; the first step is the warm-up and is not counted."""
    result = AnchorResult(name=name, procs=n_procs, numel=numel)
    for step, records in enumerate(zip(*per_rank, strict=True)):
        seconds = max(r["seconds"] for r in records)
        problem = _verify_step(list(records), op, rel)
        matchmaking = [r.get("matchmaking_s") for r in records]
        label = "warm-up" if step == 0 else f"step {step}"
        logger.info("%s %s: %.3f s (max over ranks)%s", name, label, seconds, f" FAILED: {problem}" if problem else "")
        if step == 0:
            result.warmup_seconds, result.warmup_error = seconds, problem
        elif problem:
            result.failed_steps.append(f"{label} ({seconds:.3f} s): {problem}")
        else:
            result.step_seconds.append(seconds)
            if all(m is not None for m in matchmaking):
                result.matchmaking_seconds.append(max(matchmaking))
    return result


def run_gloo_anchor(n_procs: int = 4, numel: int = 25_000_000, repeats: int = 3) -> AnchorResult:
    """Full gloo all-reduce measurement (see module docstring); raises if any rank fails."""
    params = {"n_procs": n_procs, "numel": numel, "repeats": repeats, "port": _free_port()}
    per_rank = _run_ranks(_gloo_rank, n_procs, params, SETUP_TIMEOUT_S + (repeats + 1) * STEP_TIMEOUT_S)
    return _summarize("gloo", n_procs, numel, per_rank, op="sum")


def run_hivemind_anchor(
    n_procs: int = 4, numel: int = 25_000_000, repeats: int = 3, compression: Compression = "none"
) -> AnchorResult:
    """Full hivemind averager measurement; failed or unverified steps are listed, not timed."""
    params = {"n_procs": n_procs, "numel": numel, "repeats": repeats, "prefix": f"bench{os.getpid()}{compression}",
              "compression": compression}  # fmt: skip
    per_rank = _run_ranks(_hivemind_rank, n_procs, params, 2 * SETUP_TIMEOUT_S + (repeats + 1) * 2 * STEP_TIMEOUT_S)
    name = "hivemind" if compression == "none" else f"hivemind {compression}"
    result = _summarize(name, n_procs, numel, per_rank, op="mean", rel=1e-3 if compression == "fp16" else 1e-6)
    if result.matchmaking_seconds:
        logger.info(
            "hivemind matchmaking part of the timed steps: %s s", [round(s, 3) for s in result.matchmaking_seconds]
        )
    return result


def gloo_allreduce_seconds(n_procs: int = 4, numel: int = 25_000_000, repeats: int = 3) -> float:
    """Median seconds of one gloo all_reduce of ``numel`` float32 over ``n_procs`` local processes."""
    return run_gloo_anchor(n_procs, numel, repeats).median_s


def hivemind_averager_seconds(
    n_procs: int = 4, numel: int = 25_000_000, repeats: int = 3, compression: Compression = "none"
) -> float:
    """Median seconds of one hivemind ``DecentralizedAverager.step()`` (matchmaking included)."""
    return run_hivemind_anchor(n_procs, numel, repeats, compression).median_s


def _raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM behaves like Ctrl+C, so the ``finally`` blocks reap every child."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Command line: run the selected anchors and print one JSON object on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("gloo", "hivemind"))
    parser.add_argument("--compression", choices=("none", "fp16"), default="none", help="of hivemind's averager")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, _raise_interrupt)

    out: dict[str, Any] = {"gloo_s": None, "hivemind_s": None, "numel": args.numel, "procs": args.procs}
    out["repeats"] = args.repeats
    try:
        if args.only in (None, "gloo"):
            out["gloo_s"] = round(gloo_allreduce_seconds(args.procs, args.numel, args.repeats), 4)
        if args.only in (None, "hivemind"):
            hivemind = run_hivemind_anchor(args.procs, args.numel, args.repeats, args.compression)
            out["hivemind_s"] = round(hivemind.median_s, 4)
            out["hivemind_failed_steps"] = len(hivemind.failed_steps)
    except KeyboardInterrupt:
        logger.error("interrupted; all rank processes were reaped")
        return 130
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
