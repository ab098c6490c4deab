"""Training in the swarm: N peer processes with ``diloco`` + ``int8`` against a single-process AdamW baseline on
the same total tokens, measured in one run.

The swarm: ``LocalSwarm`` starts a bootstrap node (the swarm's creator, holding the training config) and
``--peers`` ``legion-swarm join --rounds R`` processes on 127.0.0.1, each with its own ``p2pd``. Each peer trains
R rounds of H local AdamW steps on ``--batch-size`` sequences of its leased data shard, then prints its summary
(validation loss of the final shared state, tokens/s, bytes sent). The anchor, after the swarm has shut down:
``train_baseline`` on the same ``SwarmSpec`` (model, data, AdamW settings, gradient clipping), R x H steps of
``peers x batch_size`` sequences, so both have trained on

    peers x R x H x batch_size x seq_len tokens

and both are evaluated on the same held-out validation batches.

Bytes: the swarm's bytes sent per peer (collective payloads, as the peers measure them) against what per-step
``sync`` with codec ``none`` would send for the same local steps. In a sharded step of a group of G, a member
owning a shard of s floats sends ``(numel - s) x 4`` bytes in the reduce-scatter and ``(G - 1) x s x 4`` in the
all-gather; averaged over the members (the shards sum to numel) that is ``2 (G - 1) / G x 4 x numel`` bytes per
step, so ``sync_bytes_per_peer = 8 (G - 1) / G x numel x steps`` (G = peers, one group; steps = the local
steps of committed rounds, rounds_committed x H: a peer that re-syncs redoes its local work). The ratio is the
traffic reduction that DiLoCo (one exchange per H steps) and int8 buy together.

Goal (issue "Training in the swarm"): 4 peers, ``diloco`` H=20 ``int8``, built-in corpus: the swarm's validation
loss within 5 % of the baseline's. A miss is reported (``goal_met: false``), not an error; a failed swarm (a
peer crashed, or finished without a summary) prints the JSON with ``ok: false`` and exits 1.

    python benchmarks/bench_training.py                  # the goal's setting: 2 cores, 4-6 min idle, ~14 busy
    python benchmarks/bench_training.py --rounds 2       # smoke test
    python benchmarks/bench_training.py --compress none  # the same without int8

Defaults: the same AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1, clip 1.0) for the swarm's inner steps and
the baseline; outer Nesterov lr 0.7 (the swarm config's default) with momentum 0.8, not the default 0.9: that
was tuned for H = 500 local steps, and at H = 20 a single-process DiLoCo reference (4 workers, no compression,
same data) ended 1.0-1.6 points of gap lower with 0.8 on both shard sets tried (0.7 and 0.6 were no better).
Both sides use one recipe, so the comparison is like for like, not each side at its best: a baseline with
warm-up + cosine decay from lr 3e-3 reaches 2.35 where the swarm's recipe gives it 2.46-2.52, while DiLoCo's
workers (batch 8 each) did worse with that schedule (2.70) than with constant 1e-3 (2.60-2.62). 16 rounds of
20 steps of 8 sequences on 4 peers, i.e. 1.3 M tokens. The built-in corpus (~2 M byte tokens) is cut into 16
shards; each peer reads the one shard it leases, and the baseline reads 4 shards, so both make ~2.7 passes over a
quarter of the corpus.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any

from legion_swarm.cli.train import spec_from_args
from legion_swarm.sim import LocalSwarm, start_process
from legion_swarm.train.baseline import train_baseline

logger = logging.getLogger("bench_training")

HEARTBEAT_S = 1.0
START_TIMEOUT_S = 120.0
"""Seconds each process may take to print its addresses (``LocalSwarm.create`` allows 30)."""
SHARD_RE = re.compile(r"reading data shard (\d+)")
"""The trainer's log line when it starts reading a leased shard."""
GOAL_GAP_PCT = 5.0
"""The swarm's validation loss may exceed the baseline's by at most this many percent."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=4, help="peer processes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=16, help="outer rounds per peer (default: %(default)s)")
    p.add_argument("--inner-steps", type=int, default=20, help="H, local steps per round (default: %(default)s)")
    p.add_argument("--mode", default="diloco", choices=["diloco", "sync"], help="(default: %(default)s)")
    p.add_argument("--compress", default="int8", help="codec of the exchanged tensors (default: %(default)s)")
    p.add_argument("--model", default="tiny", help="model preset (default: %(default)s)")
    p.add_argument("--data", default="builtin", help="data source (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per peer per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="inner / baseline AdamW lr (default: %(default)s)")
    p.add_argument("--outer-lr", type=float, default=0.7, help="diloco outer Nesterov lr (default: %(default)s)")
    p.add_argument("--outer-momentum", type=float, default=0.8, help="(default: %(default)s; see above)")
    p.add_argument("--timeout", type=float, default=3600, help="give up on the swarm after this many seconds")
    p.add_argument("--log-dir", help="write each process's last output lines to DIR/<name>.log")
    args = p.parse_args()
    if args.peers < 2 or args.rounds < 1 or args.inner_steps < 1 or args.batch_size < 1:
        p.error("need --peers >= 2, --rounds >= 1, --inner-steps >= 1, --batch-size >= 1")
    return args


def write_config(path: str, args: argparse.Namespace) -> None:
    """The settings that have no creator flag (outer optimiser) go into the swarm's TOML config file."""
    with open(path, "w") as f:
        f.write(f"[train]\nouter_lr = {args.outer_lr!r}\nouter_momentum = {args.outer_momentum!r}\n")


def creator_argv(args: argparse.Namespace, config_path: str) -> list[str]:
    """The bootstrap node's swarm-config flags."""
    return [
        "--config", config_path, "--mode", args.mode, "--compress", args.compress, "--lr", str(args.lr),
        "--inner-steps", str(args.inner_steps), "--model", args.model, "--data", args.data,
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip


def spec_namespace(args: argparse.Namespace, config_path: str) -> argparse.Namespace:
    """The same flags as :func:`creator_argv`, for ``spec_from_args``: the baseline gets the swarm's exact spec."""
    return argparse.Namespace(
        config=config_path, mode=args.mode, compress=args.compress, lr=args.lr, inner_steps=args.inner_steps,
        model=args.model, data=args.data, batch_size=args.batch_size,
    )  # fmt: skip


async def start_swarm(args: argparse.Namespace, config_path: str) -> LocalSwarm:
    """``LocalSwarm.create``, but with a longer start-up deadline per process: on a loaded 2-core machine five
    Python processes and their ``p2pd`` daemons starting together can take longer than the default 30 s."""
    swarm = LocalSwarm(
        "bench-training", HEARTBEAT_S, (), bootstrap_args=tuple(creator_argv(args, config_path)),
        peer_args=("--rounds", str(args.rounds)),
    )  # fmt: skip
    common = ["--swarm", swarm.swarm, "--host", "127.0.0.1", "--port", "0", "--heartbeat", str(HEARTBEAT_S)]
    try:
        swarm.bootstrap = await start_process(
            "bootstrap", ["bootstrap", *common, *swarm.bootstrap_args], ready_timeout=START_TIMEOUT_S
        )

        async def add_peer(i: int) -> None:
            argv = ["join", "--peer", swarm.bootstrap.maddr, *common, *swarm.peer_args]  # type: ignore[union-attr]
            swarm.peers.append(await start_process(f"peer{i}", argv, ready_timeout=START_TIMEOUT_S))

        # Every start finishes (or fails) before we clean up, so no process is started after aclose.
        results = await asyncio.gather(*(add_peer(i) for i in range(args.peers)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
    except BaseException:
        await swarm.aclose()
        raise
    swarm.peers.sort(key=lambda p: p.name)
    return swarm


async def run_swarm(args: argparse.Namespace, config_path: str) -> dict[str, Any]:
    """Start the swarm, wait for every peer to finish its rounds, shut everything down; the peers' summaries."""
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    swarm = await start_swarm(args, config_path)
    failure = None
    try:
        started_s = time.perf_counter() - started
        logger.info("swarm up in %.1f s; training %d rounds per peer", started_s, args.rounds)
        next_log = time.perf_counter() + 60
        while any(p.running for p in swarm.peers):
            if time.perf_counter() - started > args.timeout:
                failure = f"timed out after {args.timeout:.0f} s"
                break
            assert swarm.bootstrap is not None
            if not swarm.bootstrap.running:
                failure = f"the bootstrap node exited with code {swarm.bootstrap.proc.returncode}"
                break
            crashed = [p for p in swarm.peers if not p.running and p.proc.returncode != 0]
            if crashed:
                failure = f"{crashed[0].name} exited with code {crashed[0].proc.returncode}"
                break
            if time.perf_counter() >= next_log:
                running = sum(p.running for p in swarm.peers)
                logger.info("%.0f s: %d/%d peers still training", time.perf_counter() - started, running, args.peers)
                next_log += 60
            await asyncio.sleep(1.0)
        await asyncio.gather(*(p.wait(10) for p in swarm.peers))
        summaries = {p.name: p.trained() for p in swarm.peers}
        codes = {p.name: p.proc.returncode for p in swarm.peers}
        if failure is None:
            bad = [n for n, s in summaries.items() if s is None or codes[n] != 0]
            if bad:
                failure = f"{', '.join(bad)} finished without a summary or with an error"
        tails = {} if failure is None else {p.name: p.tail(15) for p in swarm.peers}
        training_s = time.perf_counter() - started
    finally:
        await swarm.aclose()
    return {
        "summaries": summaries, "exit_codes": codes, "failure": failure, "tails": tails,
        "outputs": {p.name: list(p.output) for p in swarm.processes()},
        "startup_s": started_s, "wall_s": training_s, "total_s": time.perf_counter() - started,
        "load": [load_start, os.getloadavg()[0]],
    }  # fmt: skip


def window_means(history: list[tuple[int, float]], width: int) -> list[float]:
    """Mean training loss of each consecutive run of ``width`` steps."""
    losses = [loss for _, loss in history]
    return [round(statistics.fmean(losses[i : i + width]), 4) for i in range(0, len(losses) - width + 1, width)]


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        config_path = os.path.join(tmp, "swarm.toml")
        write_config(config_path, args)
        spec = spec_from_args(spec_namespace(args, config_path))  # a bad flag fails here, before any process
        try:
            swarm = asyncio.run(run_swarm(args, config_path))
        except Exception as e:  # the swarm did not even start: still one JSON object, and a failing exit code
            swarm = {"failure": f"{type(e).__name__}: {e}", "exit_codes": {}, "tails": {}, "outputs": {}}
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        for name, lines in swarm["outputs"].items():
            with open(os.path.join(args.log_dir, f"{name}.log"), "w") as f:
                f.write("\n".join(lines) + "\n")

    seq_len, batch, peers = spec.model.seq_len, spec.data.batch_size, args.peers
    assert seq_len is not None
    out: dict[str, Any] = {
        "benchmark": "training",
        "config": {
            "peers": peers, "rounds": args.rounds, "inner_steps": args.inner_steps, "mode": spec.train.mode,
            "codec": spec.train.resolved_codec, "model": spec.model.preset, "data": spec.data.source,
            "batch_size": batch, "seq_len": seq_len, "lr": spec.train.lr, "outer_lr": spec.train.outer_lr,
            "outer_momentum": spec.train.outer_momentum, "weight_decay": spec.train.weight_decay,
            "grad_clip": spec.train.grad_clip,
        },
    }  # fmt: skip
    if swarm["failure"] is not None:
        out.update(ok=False, error=swarm["failure"], exit_codes=swarm["exit_codes"], tails=swarm["tails"])
        print(json.dumps(out))
        return 1

    summaries = list(swarm["summaries"].values())
    steps = [s["steps"] for s in summaries]
    local_steps = args.inner_steps if spec.train.mode == "diloco" else 1  # per round
    committed_steps = statistics.fmean(s["rounds_committed"] for s in summaries) * local_steps
    numel = summaries[0]["numel"]
    swarm_val = statistics.fmean(s["val_loss"] for s in summaries)
    swarm_tokens = sum(steps) * batch * seq_len
    swarm_sent = statistics.fmean(s["bytes_sent"] for s in summaries)
    peer_tps = statistics.fmean(s["tokens_per_s"] for s in summaries)

    shards = sorted({
        int(m) for name, lines in swarm["outputs"].items() if name != "bootstrap" for line in lines
        for m in SHARD_RE.findall(line)
    })  # fmt: skip

    # The anchor, after the swarm is gone (so they do not compete for cores): as many tokens as the whole swarm.
    baseline_steps = args.rounds * local_steps
    logger.info("baseline: %d steps of %d x %d sequences", baseline_steps, peers, batch)
    started = time.perf_counter()
    same_shards = shards if len(shards) == peers else None  # a peer that switched shards: fall back to 0..peers-1
    base = train_baseline(spec, baseline_steps, batch_multiplier=peers, shards=same_shards)
    baseline_total_s = time.perf_counter() - started
    load_end = os.getloadavg()[0]

    # Local steps whose work a committed round used (a peer that re-syncs redoes its local work).
    sync_sent = 8 * (peers - 1) / peers * numel * committed_steps
    gap_pct = (swarm_val - base.val_loss) / base.val_loss * 100
    best_gap_pct = (min(s["val_loss"] for s in summaries) - base.val_loss) / base.val_loss * 100
    peer_histories = [[tuple(h) for h in s["history"]] for s in summaries]
    rounds_seen = min(len(h) for h in peer_histories)
    swarm_curve = [round(statistics.fmean(h[i][1] for h in peer_histories), 4) for i in range(rounds_seen)]
    out.update({
        "ok": True,
        "swarm": {
            "val_loss": round(swarm_val, 5),
            "val_loss_per_peer": [round(s["val_loss"], 5) for s in summaries],
            "first_loss": round(statistics.fmean(s["first_loss"] for s in summaries), 4),
            "rounds_committed": [s["rounds_committed"] for s in summaries],
            "rounds_failed": [s["rounds_failed"] for s in summaries],
            "resyncs": [s["resyncs"] for s in summaries],
            "final_round": [s["rounds"] for s in summaries],
            "steps_per_peer": steps,
            "data_shards": shards,
            "tokens": swarm_tokens,
            "numel": numel,
            "bytes_sent_per_peer": round(swarm_sent),
            "bytes_received_per_peer": round(statistics.fmean(s["bytes_received"] for s in summaries)),
            "tokens_per_s_per_peer": round(peer_tps, 1),
            "tokens_per_s_total": round(sum(s["tokens_per_s"] for s in summaries), 1),
            "train_loss_per_round": swarm_curve,
            "startup_s": round(swarm["startup_s"], 1),
            "peer_train_s": round(statistics.fmean(s["seconds"] for s in summaries), 1),
            "wall_s": round(swarm["total_s"], 1),
        },
        "baseline": {
            "val_loss": round(base.val_loss, 5),
            "steps": baseline_steps,
            "batch_sequences": peers * batch,
            "data_shards": same_shards if same_shards is not None else list(range(peers)),
            "tokens": base.tokens,
            "tokens_per_s": round(base.tokens_per_s, 1),
            "train_loss_per_round": window_means(base.history, local_steps),
            "train_s": round(base.seconds, 1),
            "wall_s": round(baseline_total_s, 1),
        },
        "sync_bytes_sent_per_peer": round(sync_sent),
        "ratios": {
            "val_loss_gap_pct": round(gap_pct, 3),
            "best_peer_val_loss_gap_pct": round(best_gap_pct, 3),
            "sync_bytes_over_swarm_bytes": round(sync_sent / swarm_sent, 2) if swarm_sent else None,
            "peer_tokens_per_s_over_single": round(peer_tps / base.tokens_per_s, 3),
            "swarm_tokens_per_s_over_single": round(peer_tps * peers / base.tokens_per_s, 3),
            "swarm_tokens_over_baseline_tokens": round(swarm_tokens / base.tokens, 4),
        },
        "goal": {
            "target": f"swarm val loss within {GOAL_GAP_PCT:g} % of the baseline's",
            "setting_matches_goal": (peers, spec.train.mode, args.inner_steps, spec.train.resolved_codec, args.data)
            == (4, "diloco", 20, "int8", "builtin"),
            "goal_met": gap_pct <= GOAL_GAP_PCT,
        },
        "seconds_total": round(swarm["total_s"] + baseline_total_s, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1min": {
                "swarm_start": round(swarm["load"][0], 2), "swarm_end": round(swarm["load"][1], 2),
                "baseline_end": round(load_end, 2),
            },
        },
        "notes": (
            "val_loss_gap_pct = (swarm - baseline) / baseline x 100, swarm = mean over the peers' final states, "
            "both on the same held-out batches. "
            "sync_bytes_sent_per_peer = 8 (G - 1) / G x numel x committed local steps per peer (rounds_committed x H) "
            "with G = peers: per step, a sharded "
            "sync step (codec none, fp32) sends (numel - own shard) x 4 bytes in the reduce-scatter and "
            "(G - 1) x own shard x 4 in the all-gather, 2 (G - 1) / G x 4 x numel on average per member. "
            "Swarm bytes are collective payloads measured by the peers. Tokens/s per peer includes waiting for "
            "the group; the peers share the machine's cores, the baseline runs after them. Other work on a shared "
            "machine skews the two parts differently: see machine.load_avg_1min. The baseline reads shards "
            "the shards the peers leased when each peer kept one shard (data_shards), else 0..peers-1."
        ),
    })  # fmt: skip
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
