"""Unequal peers: a swarm of peers at different speeds against the sum of what each computes alone, and against a
homogeneous swarm that trains on the same total tokens, measured in one run.

Three parts, one after the other on this machine:

1. **Solo**: one process per speed, all at once (so they share the cores as the swarm's peers do), each running
   the swarm's inner loop alone (the model, AdamW, its batches) on a compute thread throttled to its speed, for
   ``--solo-seconds``. Their tokens/s summed is what the volunteers' hardware could compute together.
2. **Heterogeneous swarm**: ``LocalSwarm`` with one peer per speed (``--speed`` throttles its compute thread for
   real), ``diloco`` rounds by time (``--train-round-seconds``, inner steps capped high), ``--rounds`` rounds.
   Swarm tokens/s = the samples each peer contributed to committed rounds x seq_len / its training seconds
   (from its first round's start to its last round's end), summed; compute utilisation = each peer's seconds
   in local steps over those seconds. Work thrown away = samples a re-sync dropped. The fastest member's wait:
   seconds from asking for a round to the group being formed (median over rounds, and how many rounds it
   waited over half a second).
3. **Homogeneous swarm**: as many peers, all at full speed, in rounds by steps: the same rounds, with the inner
   steps that make its total tokens equal the heterogeneous swarm's. Its final validation loss is the anchor.

Goals (issue "Volunteer hardware"): swarm tokens/s >= 0.9 x the solo sum; 0 samples thrown away; final
validation loss at most 2 % above the homogeneous swarm's (the gap is printed signed: lower is better).
Prints one JSON object; exits 1 if a swarm failed.

    python benchmarks/bench_heterogeneous.py                      # speeds 1,0.5,0.25, 12 rounds of 6 s: ~5 min
    python benchmarks/bench_heterogeneous.py --rounds 3 --round-seconds 3 --solo-seconds 5   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from typing import Any

logger = logging.getLogger("bench_heterogeneous")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speeds", default="1,0.5,0.25", help="one peer per speed (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=12, help="rounds per swarm (default: %(default)s)")
    p.add_argument("--round-seconds", type=float, default=6.0, help="round budget (default: %(default)s)")
    p.add_argument("--solo-seconds", type=float, default=20.0, help="solo measurement (default: %(default)s)")
    p.add_argument("--model", default="tiny", help="model preset (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--compress", default="int8", help="(default: %(default)s)")
    p.add_argument("--solo", type=float, help=argparse.SUPPRESS)  # internal: run one solo measurement
    args = p.parse_args(argv)
    args.speed_list = [float(s) for s in args.speeds.split(",")]
    if not all(0 < s <= 1 for s in args.speed_list) or len(args.speed_list) < 2:
        p.error("--speeds needs two or more fractions in (0, 1]")
    return args


def spec_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--mode",
        "diloco",
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--compress",
        args.compress,
    ]


def solo(args: argparse.Namespace) -> dict[str, Any]:
    """The swarm's inner loop alone, on a compute thread throttled to ``args.solo``: tokens/s."""
    import torch

    from legion_swarm.cli.train import spec_from_args
    from legion_swarm.train.compute import Compute
    from legion_swarm.train.data import ShardReader, load_tokens
    from legion_swarm.train.device import forward_backward
    from legion_swarm.train.model import build_model
    from legion_swarm.train.modes import trainable
    from legion_swarm.train.optim import LocalAdamW

    torch.set_num_threads(1)  # as the swarm's peers run here (threads_per_peer)
    ns = argparse.Namespace(model=args.model, batch_size=args.batch_size, mode="diloco", compress=args.compress)
    spec = spec_from_args(ns)
    data, model = load_tokens(spec.data), build_model(spec.model)
    params = trainable(model)
    inner = LocalAdamW(params, **spec.train.adamw())  # type: ignore[arg-type]
    reader = ShardReader(data.shard(0), spec.model.seq_len, spec.data.batch_size, seed=spec.data.seed)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        inner.zero_grad()
        forward_backward(model, batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        inner.step()

    def loop(compute: Compute) -> int:  # back to back on the compute thread, throttled per step, as a peer
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.solo_seconds:
            began = time.perf_counter()
            step(next(reader))
            compute.pause(time.perf_counter() - began)
            steps += 1
        return steps

    async def run() -> dict[str, Any]:
        compute = Compute(speed=args.solo)
        started = time.perf_counter()
        try:
            steps = await compute.run(loop, compute, throttled=False)
        finally:
            compute.close()
        seconds = time.perf_counter() - started
        assert spec.model.seq_len is not None
        return {
            "speed": args.solo,
            "steps": steps,
            "tokens_per_s": steps * spec.data.batch_size * spec.model.seq_len / seconds,
        }

    return asyncio.run(run())


async def solo_rates(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One solo process per speed, concurrently."""
    argv = [sys.argv[0], "--model", args.model, "--batch-size", str(args.batch_size), "--solo-seconds",
            str(args.solo_seconds)]  # fmt: skip
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, *argv, "--solo", str(s), stdout=asyncio.subprocess.PIPE, env=os.environ.copy()
        )
        for s in args.speed_list
    ]
    outs = await asyncio.gather(*(p.communicate() for p in procs))
    return [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]


async def run_swarm(name: str, bootstrap_args: list[str], per_peer: list[tuple[str, ...]], rounds: int) -> dict:
    from legion_swarm.sim import LocalSwarm

    started = time.perf_counter()
    async with await LocalSwarm.create(
        len(per_peer), swarm=name, bootstrap_args=tuple(bootstrap_args),
        peer_args=("--rounds", str(rounds), "--threads", "1"), per_peer_args=per_peer,
    ) as swarm:  # fmt: skip
        while any(p.running for p in swarm.peers) and time.perf_counter() - started < 1800:
            crashed = [p for p in swarm.peers if not p.running and p.proc.returncode != 0]
            if crashed:
                return {"failure": f"{crashed[0].name} exited with {crashed[0].proc.returncode}",
                        "tail": crashed[0].tail(20)}  # fmt: skip
            await asyncio.sleep(1.0)
        summaries = [p.trained() for p in sorted(swarm.peers, key=lambda p: p.name)]  # peer i got per_peer[i]
    if any(s is None for s in summaries):
        return {"failure": "a peer finished without a summary"}
    return {"failure": None, "summaries": summaries, "wall_s": round(time.perf_counter() - started, 1)}


def swarm_numbers(summaries: list[dict], seq_len: int, batch: int) -> dict[str, Any]:
    tokens = [s["samples"] * seq_len for s in summaries]
    return {
        "val_loss": round(statistics.fmean(s["val_loss"] for s in summaries), 5),
        "tokens": sum(tokens),
        "tokens_per_s": round(sum(t / s["train_s"] for t, s in zip(tokens, summaries, strict=True)), 1),
        "train_s_per_peer": [s["train_s"] for s in summaries],
        "compute_utilisation_per_peer": [round(s["compute_s"] / s["train_s"], 3) for s in summaries],
        "samples_per_peer": [s["samples"] for s in summaries],
        "samples_dropped": sum(s["samples_dropped"] for s in summaries),
        "rounds_committed": [s["rounds_committed"] for s in summaries],
        "resyncs": [s["resyncs"] for s in summaries],
        "group_sizes": [s["group_sizes"] for s in summaries],
        "bytes_sent_per_peer": round(statistics.fmean(s["bytes_sent"] for s in summaries)),
    }


def main() -> int:
    args = parse_args()
    if args.solo is not None:
        print(json.dumps(solo(args)))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    from legion_swarm.config import ModelConfig

    seq_len = ModelConfig(preset=args.model).seq_len
    assert seq_len is not None
    started = time.perf_counter()
    logger.info("solo rates for speeds %s", args.speed_list)
    solos = asyncio.run(solo_rates(args))
    solo_sum = sum(s["tokens_per_s"] for s in solos)

    hetero_spec = [*spec_flags(args), "--train-round-seconds", str(args.round_seconds), "--inner-steps", "100000"]
    logger.info("heterogeneous swarm: %d rounds of %.1f s", args.rounds, args.round_seconds)
    hetero = asyncio.run(run_swarm("hetero", hetero_spec, [("--speed", str(s)) for s in args.speed_list], args.rounds))
    out: dict[str, Any] = {
        "benchmark": "heterogeneous",
        "config": {
            "speeds": args.speed_list,
            "rounds": args.rounds,
            "round_seconds": args.round_seconds,
            "model": args.model,
            "batch_size": args.batch_size,
            "seq_len": seq_len,
            "codec": args.compress,
            "cpus": os.cpu_count(),
        },
        "solo": solos,
        "solo_tokens_per_s_sum": round(solo_sum, 1),
    }
    if hetero["failure"]:
        out.update(ok=False, error=f"heterogeneous swarm: {hetero['failure']}", tail=hetero.get("tail"))
        print(json.dumps(out))
        return 1
    h = swarm_numbers(hetero["summaries"], seq_len, args.batch_size)
    fastest = hetero["summaries"][args.speed_list.index(max(args.speed_list))]
    waits = fastest["waits"]
    h.update(
        wall_s=hetero["wall_s"], fastest_wait_median_s=round(statistics.median(waits), 3) if waits else None,
        fastest_rounds_waited_over_half_s=sum(w > 0.5 for w in waits),
    )  # fmt: skip

    # The homogeneous swarm: the same rounds and total tokens, every peer at full speed, rounds by steps.
    n = len(args.speed_list)
    inner = max(1, round(h["tokens"] / (seq_len * args.batch_size * n * args.rounds)))
    logger.info("homogeneous swarm: %d peers, %d rounds of %d steps", n, args.rounds, inner)
    homo = asyncio.run(run_swarm("homo", [*spec_flags(args), "--inner-steps", str(inner)], [()] * n, args.rounds))
    if homo["failure"]:
        out.update(ok=False, heterogeneous=h, error=f"homogeneous swarm: {homo['failure']}")
        print(json.dumps(out))
        return 1
    m = swarm_numbers(homo["summaries"], seq_len, args.batch_size)
    m.update(inner_steps=inner, wall_s=homo["wall_s"])
    out.update(
        ok=True, heterogeneous=h, homogeneous=m,
        ratios={
            "swarm_tokens_per_s_over_solo_sum": round(h["tokens_per_s"] / solo_sum, 3),
            "val_loss_gap_vs_homogeneous_pct": round((h["val_loss"] - m["val_loss"]) / m["val_loss"] * 100, 3),
            "tokens_over_homogeneous_tokens": round(h["tokens"] / m["tokens"], 3),
            "samples_per_speed": [round(s / v) for s, v in zip(h["samples_per_peer"], args.speed_list, strict=True)],
        },
        goals={
            "tokens_per_s_ge_0.9_solo_sum": h["tokens_per_s"] >= 0.9 * solo_sum,
            "nothing_thrown_away": h["samples_dropped"] == 0,
            "val_loss_at_most_2pct_above_homogeneous": h["val_loss"] <= 1.02 * m["val_loss"],
        },
        seconds_total=round(time.perf_counter() - started, 1),
        notes="Solo processes run concurrently, one torch thread each, as the swarm's peers do; the swarm's "
        "tokens are those of committed rounds. Both swarms use the same codec and outer optimizer; the "
        "homogeneous one gets the inner steps that match the heterogeneous swarm's total tokens.",
    )  # fmt: skip
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
