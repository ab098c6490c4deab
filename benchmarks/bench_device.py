"""One peer's local work on each device and precision this machine has, against plain single-process torch on the
same device, measured in one run.

- **ours**: a ``diloco`` mode (:class:`~legion_swarm.train.modes.DiLoCoMode`) on a
  :class:`~legion_swarm.train.device.Placement`: its inner steps back to back in one call on the compute thread,
  under autocast, with the swarm's AdamW and gradient clipping, batches moved to the device, as a peer runs a
  round's local work.
- **torch**: the loop a user would write: the model on the device, ``torch.optim.AdamW`` (torch's default
  implementation for the device), ``torch.autocast`` and, for fp16, ``torch.amp.GradScaler``, on the calling
  thread.

Both train the same model from the same initialisation on the same batches; each timed after warm-up steps, each
measurement in a process of its own (alternating ours and torch's), so one loop's thread pools never compete with
the other's: torch's CPU kernels keep an OpenMP team per calling thread, and ours runs on the compute thread.
Goal (issue "Volunteer hardware"): ours >= 0.9 x torch's tokens/s on every device and precision. Prints one JSON
object.

    python benchmarks/bench_device.py                    # every device and precision: ~1 min on 2 CPU cores
    python benchmarks/bench_device.py --model small --steps 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
from typing import Any

import torch

from legion_swarm.collectives import Collectives
from legion_swarm.config import CollectiveConfig, DataConfig, ModelConfig, TrainConfig
from legion_swarm.train.compute import Compute
from legion_swarm.train.data import ShardReader, load_tokens
from legion_swarm.train.device import PRECISIONS, Placement, available_devices
from legion_swarm.train.model import build_model
from legion_swarm.train.modes import DiLoCoMode, trainable
from legion_swarm.transport.dataplane import DataPlane
from legion_swarm.transport.identity import Identity

logger = logging.getLogger("bench_device")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model preset (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="alternating measurements each (default: %(default)s)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="to measure (default: %(default)s)")
    p.add_argument("--measure", nargs=3, metavar=("LOOP", "DEVICE", "PRECISION"), help=argparse.SUPPRESS)
    return p.parse_args()


def batches(n: int, model: ModelConfig, data: DataConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens = load_tokens(data)
    reader = ShardReader(tokens.shard(0), model.seq_len, data.batch_size, seed=data.seed)
    return [next(reader) for _ in range(n)]


def supported(device: torch.device, precision: str) -> bool:
    try:
        Placement(device, precision)
    except Exception:
        return False
    return True


def torch_loop(config: ModelConfig, train: TrainConfig, device: torch.device, precision: str, data: list) -> float:
    """Plain torch: seconds for the timed steps (after ``warmup``)."""
    model = build_model(config).to(device)
    params = trainable(model)
    opt = torch.optim.AdamW(params, **train.adamw())  # type: ignore[arg-type]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        opt.zero_grad(set_to_none=False)
        with autocast():
            _, loss = model(x, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip or 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip or 1.0)
            opt.step()

    return _timed(step, data, device)


async def our_loop(config: ModelConfig, train: TrainConfig, device: torch.device, precision: str, data: list) -> float:
    """The swarm's diloco mode between rounds: seconds for the timed steps (after ``warmup``)."""
    plane = await DataPlane.create(Identity.generate())
    compute = Compute()
    try:
        placement = Placement(device, precision)
        model = build_model(config).to(device)
        mode = DiLoCoMode(model, Collectives(plane, CollectiveConfig()), train, compute=compute, placement=placement)
        warmup, timed = data[: ARGS.warmup], data[ARGS.warmup :]

        def steps() -> float:  # as the trainer runs a round's local work: back to back on the compute thread
            for batch in warmup:
                mode.compute_step(batch)
            placement.synchronize()
            started = time.perf_counter()
            for batch in timed:
                mode.compute_step(batch)
            placement.synchronize()
            return time.perf_counter() - started

        return await compute.run(steps)
    finally:
        compute.close()
        await plane.aclose()


def _timed(step: Any, data: list, device: torch.device) -> float:
    placement = Placement(device)
    for batch in data[: ARGS.warmup]:
        step(batch)
    placement.synchronize()
    started = time.perf_counter()
    for batch in data[ARGS.warmup :]:
        step(batch)
    placement.synchronize()
    return time.perf_counter() - started


ARGS: argparse.Namespace


def measure(loop: str, device: torch.device, precision: str) -> float:
    """Seconds of ``loop``'s timed steps, in this process."""
    model = ModelConfig(preset=ARGS.model)
    data = batches(ARGS.warmup + ARGS.steps, model, DataConfig(batch_size=ARGS.batch_size))
    if loop == "torch":
        return torch_loop(model, TrainConfig(), device, precision, data)
    return asyncio.run(our_loop(model, TrainConfig(), device, precision, data))


def in_subprocess(loop: str, device: str, precision: str) -> float:
    flags = ["--model", ARGS.model, "--batch-size", str(ARGS.batch_size), "--steps", str(ARGS.steps),
             "--warmup", str(ARGS.warmup)]  # fmt: skip
    out = subprocess.run(
        [sys.executable, __file__, *flags, "--measure", loop, device, precision],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    global ARGS
    ARGS = parse_args()
    if ARGS.measure is not None:
        loop, device, precision = ARGS.measure
        print(measure(loop, torch.device(device), precision))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    model = ModelConfig(preset=ARGS.model)
    assert model.seq_len is not None
    tokens = ARGS.steps * ARGS.batch_size * model.seq_len
    results = []
    for name in available_devices():
        device = torch.device(name)
        for precision in ARGS.precisions.split(","):
            if not supported(device, precision):
                results.append({"device": name, "precision": precision, "supported": False})
                continue
            ours, plain = [], []
            for _ in range(ARGS.repeats):  # alternate, so drift on a shared machine hits both
                plain.append(in_subprocess("torch", name, precision))
                ours.append(in_subprocess("ours", name, precision))
            row = {
                "device": name, "precision": precision, "supported": True,
                "ours_tokens_per_s": round(tokens / min(ours), 1), "torch_tokens_per_s": round(tokens / min(plain), 1),
            }  # fmt: skip
            row["ratio"] = round(row["ours_tokens_per_s"] / row["torch_tokens_per_s"], 3)
            logger.info("%s %s: ours %.0f tok/s, torch %.0f tok/s (x%.2f)", name, precision,
                        row["ours_tokens_per_s"], row["torch_tokens_per_s"], row["ratio"])  # fmt: skip
            results.append(row)
    measured = [r for r in results if r["supported"]]
    print(json.dumps({
        "benchmark": "device",
        "config": {"model": ARGS.model, "batch_size": ARGS.batch_size, "seq_len": model.seq_len, "steps": ARGS.steps,
                   "warmup": ARGS.warmup, "repeats": ARGS.repeats, "torch": torch.__version__,
                   "threads": torch.get_num_threads()},
        "results": results,
        "goal": {"ours_ge_0.9_torch_everywhere": all(r["ratio"] >= 0.9 for r in measured)},
        "notes": "best of the repeats for each; ours = the diloco mode's inner steps on its compute thread (autocast, "
        "the swarm's AdamW, clipping); torch = torch.optim.AdamW defaults, autocast, GradScaler for fp16.",
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
