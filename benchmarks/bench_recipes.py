"""Which optimiser recipe closes the DiLoCo gap? Single-process DiLoCo with N simulated workers against the AdamW
baseline on the same shards and tokens, with an lr schedule and outer momentum of choice, in one process.

The sides are ``train_baseline`` and ``reference_diloco``, which the swarm's ``diloco`` mode equals to fp32
tolerance without compression (``tests``), so a recipe can be tried here in ~3.5 min per side on one core
instead of a full ``bench_training.py`` run. Both sides get the same schedule: the step count is the local
step (``round x H + h``) for DiLoCo, the step for the baseline.

    python benchmarks/bench_recipes.py --side base --shards 0,1,2,3
    python benchmarks/bench_recipes.py --side diloco --shards 0,1,2,3 --outer-momentum 0.8
    python benchmarks/bench_recipes.py --side diloco --schedule cosine --lr 3e-3

Prints one JSON object with the final validation loss (same held-out batches as ``bench_training.py``).
Schedules: ``constant``; ``cosine`` (linear warm-up, cosine decay to 10 % of lr); ``wsd`` (warm-up, constant,
linear decay to 10 % over the last quarter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch

from legion_swarm.train.baseline import train_baseline
from legion_swarm.train.data import ShardReader, evaluate, load_tokens, val_batches
from legion_swarm.train.model import build_model
from legion_swarm.train.reference import reference_diloco
from legion_swarm.train.swarm_config import SwarmSpec

MIN_LR_RATIO = 0.1


def lr_at(schedule: str, step: int, total: int, peak: float, warmup: int) -> float:
    """The learning rate of 0-based ``step`` of ``total``."""
    if schedule == "constant":
        return peak
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))
    decay_from = 0.75 * total  # wsd
    if step < decay_from:
        return peak
    return peak * (1 - (1 - MIN_LR_RATIO) * (step - decay_from) / (total - decay_from))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=["base", "diloco"], required=True)
    p.add_argument("--shards", default="0,1,2,3", help="one data shard per worker (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--inner-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=["constant", "cosine", "wsd"], default="constant")
    p.add_argument("--warmup", type=int, default=16, help="warm-up steps of cosine / wsd (default: %(default)s)")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    args = p.parse_args()
    shards = [int(s) for s in args.shards.split(",")]
    if args.rounds < 1 or args.inner_steps < 1 or args.lr <= 0 or not shards:
        p.error("need --rounds >= 1, --inner-steps >= 1, --lr > 0 and at least one shard")
    torch.set_num_threads(1)

    spec = SwarmSpec()
    spec = dataclasses.replace(spec, train=dataclasses.replace(
        spec.train, lr=args.lr, outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
    ))  # fmt: skip
    total = args.rounds * args.inner_steps

    def lr(step: int) -> float:
        return lr_at(args.schedule, step, total, args.lr, args.warmup)

    started = time.perf_counter()
    if args.side == "base":  # one batch from every shard per step: bench_training's baseline
        val = train_baseline(spec, total, batch_multiplier=len(shards), shards=shards, lr_at=lr).val_loss
    else:  # each worker reads its shard as the peer leasing it would
        data = load_tokens(spec.data)
        seq_len, batch = spec.model.seq_len, spec.data.batch_size
        assert seq_len is not None
        readers = [ShardReader(data.shard(i), seq_len, batch, seed=spec.data.seed + i) for i in shards]
        rounds = [[[next(r) for _ in range(args.inner_steps)] for r in readers] for _ in range(args.rounds)]
        model = reference_diloco(build_model(spec.model), rounds, spec.train, lr_at=lr)
        val = evaluate(model, val_batches(data.val, seq_len, batch, 8))
    print(json.dumps({
        "side": args.side, "shards": shards, "schedule": args.schedule, "lr": args.lr, "warmup": args.warmup,
        "outer_lr": args.outer_lr, "outer_momentum": args.outer_momentum, "rounds": args.rounds,
        "inner_steps": args.inner_steps, "val_loss": round(val, 4), "seconds": round(time.perf_counter() - started),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
