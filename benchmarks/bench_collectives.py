"""All-reduce of 4 x 100 MB between separate processes on loopback: ours over each data plane and codec,
against torch.distributed gloo and hivemind's DecentralizedAverager in the same run.

Ours: ``Collectives.all_reduce`` (reduce-scatter, owner average, all-gather, commit vote) in ``--procs``
worker processes (``legion_swarm.collectives.worker``), each with a p2pd host and a direct-TCP endpoint;
one warm-up round, then ``--repeats`` rounds, each started on a barrier as the gloo anchor's are (the
parent releases all members once every one of them has refreshed its inputs); a round's time is its
slowest member's, the result the median. Anchors (``collective_anchors.py``): gloo ``all_reduce`` and
hivemind ``DecentralizedAverager.step`` on the same data size, measured the same way, the latter both without
compression and with its ``Float16Compression`` (like for like with our ``fp16``).

    python benchmarks/bench_collectives.py                     # 4 procs x 25 M floats, ~3-4 minutes
    python benchmarks/bench_collectives.py --numel 1000000 --repeats 2 --skip-anchors

Prints one JSON object: ``gloo_s``, ``hivemind_s``, ``hivemind_fp16_s``, ``ours`` → plane → codec → seconds,
``ratios`` and ``goals``. Goals: direct TCP with ``none`` ≤ 2× gloo's time; the libp2p-stream plane ≥ 3× faster
than hivemind, codec for codec (``none`` against its float32, ``fp16`` against its float16). The libp2p daemons
alone need about as long as our ``none`` round for its bytes (``bench_p2pd_ceiling.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from collective_anchors import gloo_allreduce_seconds, hivemind_averager_seconds

from legion_swarm.collectives.worker import WorkerProcess

logger = logging.getLogger("bench_collectives")


def measure_ours(
    n_procs: int, numel: int, repeats: int, planes: list[str], codecs: list[str]
) -> dict[str, dict[str, float]]:
    workers = [WorkerProcess(libp2p=True) for _ in range(n_procs)]
    try:
        for w in workers:
            w.ready(timeout=120)
        results: dict[str, dict[str, float]] = {}
        for plane in planes:
            for codec in codecs:
                job = {
                    "members": [w.member for w in workers], "round_id": os.urandom(8).hex(),
                    "config": {"plane": plane, "codec": codec}, "op": "all_reduce", "sizes": [numel], "seed": 1,
                    "weight": 1.0, "rounds": 1 + repeats, "fault": None, "save": None, "barrier": True,
                }  # fmt: skip
                for w in workers:
                    w.submit(job)
                per_round = []
                for _ in range(1 + repeats):
                    for w in workers:  # every member at the barrier, then all released together
                        if not w.read(timeout=600).get("barrier"):
                            raise RuntimeError(f"{plane}/{codec}: a worker reported before its barrier")
                    for w in workers:
                        w.release()
                    per_round.append([w.read(timeout=600) for w in workers])
                seconds = []
                for reports in per_round[1:]:
                    for report in reports:
                        if "error" in report or report["missing_shards"] or set(report["planes"].values()) != {plane}:
                            raise RuntimeError(f"{plane}/{codec}: bad round {report}")
                    seconds.append(max(r["seconds"] for r in reports))
                results.setdefault(plane, {})[codec] = round(statistics.median(seconds), 4)
                logger.info("ours %s %s: %s s per round (%s)", plane, codec, results[plane][codec], seconds)
        return results
    finally:
        for w in workers:
            w.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--planes", default="direct,libp2p")
    parser.add_argument("--codecs", default="none,fp16,int8")
    parser.add_argument("--skip-anchors", action="store_true", help="only measure ours (no ratios)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if args.procs < 2 or args.numel < 1 or args.repeats < 1:
        parser.error("need --procs >= 2, --numel >= 1, --repeats >= 1")

    out: dict[str, Any] = {"procs": args.procs, "numel": args.numel, "repeats": args.repeats}
    ours = measure_ours(args.procs, args.numel, args.repeats, args.planes.split(","), args.codecs.split(","))
    if not args.skip_anchors:
        out["gloo_s"] = round(gloo_allreduce_seconds(args.procs, args.numel, args.repeats), 4)
        out["hivemind_s"] = round(hivemind_averager_seconds(args.procs, args.numel, args.repeats), 4)
        if "fp16" in args.codecs.split(","):  # its like-for-like anchor, ~40 s: only when ours is measured
            out["hivemind_fp16_s"] = round(hivemind_averager_seconds(args.procs, args.numel, args.repeats, "fp16"), 4)
    out["ours"] = ours
    if not args.skip_anchors:
        ratios: dict[str, float] = {}
        for plane, by_codec in ours.items():
            for codec, seconds in by_codec.items():
                ratios[f"{plane}_{codec}_vs_gloo"] = round(seconds / out["gloo_s"], 2)
                ratios[f"hivemind_vs_{plane}_{codec}"] = round(out["hivemind_s"] / seconds, 2)
                if codec == "fp16":  # like for like: hivemind's averager sending float16 too
                    ratios[f"hivemind_fp16_vs_{plane}_fp16"] = round(out["hivemind_fp16_s"] / seconds, 2)
        out["ratios"] = ratios
        direct_none, libp2p = ours.get("direct", {}).get("none"), ours.get("libp2p", {})
        out["goals"] = {
            "direct_none_le_2x_gloo": direct_none is not None and direct_none <= 2 * out["gloo_s"],
            "libp2p_none_ge_3x_faster_than_hivemind": "none" in libp2p and out["hivemind_s"] >= 3 * libp2p["none"],
            "libp2p_fp16_ge_3x_faster_than_hivemind_fp16": "fp16" in libp2p
            and out["hivemind_fp16_s"] >= 3 * libp2p["fp16"],
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
