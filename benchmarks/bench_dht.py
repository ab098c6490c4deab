"""DHT membership at N in-process peers: join time, full status read, store / get latency.

Each size N runs twice in the same process, one after the other on the same machine:
``ours`` (legion_swarm.SwarmPeer: signed records, schema checks, heartbeats) and the ``anchor``,
bare hivemind (P2P + DHTNode, no validator, no heartbeat) doing the same joins, stores and gets.
Ratios ours / anchor show what our layer costs independently of how loaded the machine is.

    python benchmarks/bench_dht.py                 # N = 16, 32, 64 (a few minutes on 2 cores)
    python benchmarks/bench_dht.py --sizes 8 --ops 10

Prints one JSON object. Goals at N = 64: join median <= 1 s, full status read <= 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import sys
import time

from legion_swarm import HostConfig, MembershipConfig, PeerConfig, PeerRecord, SwarmPeer


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


async def bench_ours(n: int, ops: int, rng: random.Random, heartbeat_s: float) -> dict:
    peers: list[SwarmPeer] = []
    joins = []
    phases: dict[str, list[float]] = {}
    try:
        for i in range(n):
            entry = () if not peers else (rng.choice(peers).maddrs[0],)
            config = PeerConfig(
                host=HostConfig(host="127.0.0.1", initial_peers=entry),
                membership=MembershipConfig(
                    swarm="bench", role="bootstrap" if i == 0 else "peer", heartbeat_s=heartbeat_s
                ),
            )
            t0 = time.perf_counter()
            peers.append(await SwarmPeer.create(config))
            if i:
                joins.append(time.perf_counter() - t0)
                for phase, seconds in peers[-1].join_timings.items():
                    phases.setdefault(phase, []).append(seconds)

        # Full status: a client-mode observer joins through a random member and reads every record.
        # Records are written as peers join, so the first read right after the last join is the real test.
        t0 = time.perf_counter()
        observer = await SwarmPeer.create(
            PeerConfig(
                host=HostConfig(host="127.0.0.1", client_mode=True, initial_peers=(rng.choice(peers).maddrs[0],)),
                membership=MembershipConfig(swarm="bench", role="observer"),
            )
        )
        joined = time.perf_counter() - t0
        reads, complete = [], []
        try:
            for _ in range(5):
                view = await observer.view()
                reads.append(view.read_s)
                complete.append(len(view.members))
        finally:
            await observer.aclose()

        stores, gets = [], []
        for _ in range(ops):
            writer, reader = rng.sample(peers, 2)
            t0 = time.perf_counter()
            await writer.membership.publish()
            stores.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await reader.dht.read_all("legion/bench/peers", PeerRecord)
            gets.append(time.perf_counter() - t0)
        return {
            "join_median_s": round(statistics.median(joins), 3),
            "join_p90_s": round(statistics.quantiles(joins, n=10)[-1], 3) if len(joins) > 1 else None,
            "join_phase_median_s": {k: round(statistics.median(v), 3) for k, v in phases.items()},
            "status_join_and_read_s": round(joined + reads[0], 3),
            "status_read_median_s": round(statistics.median(reads), 4),
            "status_members_seen": complete,
            "store_median_ms": median_ms(stores),
            "get_median_ms": median_ms(gets),
        }
    finally:
        await asyncio.gather(*(p.aclose() for p in peers), return_exceptions=True)


async def bench_anchor(n: int, ops: int, rng: random.Random) -> dict:
    """Bare hivemind: the same operations with no signatures, schemas or heartbeats."""
    from hivemind.dht import DHTNode
    from hivemind.dht.routing import get_dht_time
    from hivemind.p2p import P2P

    nodes: list[tuple[P2P, DHTNode, str]] = []
    joins = []
    try:
        for _ in range(n):
            entry = [rng.choice(nodes)[2]] if nodes else None
            t0 = time.perf_counter()
            p2p = await P2P.create(initial_peers=entry, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False)
            node = await DHTNode.create(p2p=p2p, initial_peers=entry)
            if entry:
                joins.append(time.perf_counter() - t0)
            maddr = str((await p2p.get_visible_maddrs())[0])
            nodes.append((p2p, node, maddr))
            await node.store("anchor", {"peer": maddr}, get_dht_time() + 300, subkey=p2p.peer_id.to_base58())
        stores, gets = [], []
        for _ in range(ops):
            (wp, writer, wm), (_, reader, _) = rng.sample(nodes, 2)
            t0 = time.perf_counter()
            await writer.store("anchor", {"peer": wm}, get_dht_time() + 300, subkey=wp.peer_id.to_base58())
            stores.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await reader.get("anchor", latest=True)
            gets.append(time.perf_counter() - t0)
        return {
            "join_median_s": round(statistics.median(joins), 3),
            "store_median_ms": median_ms(stores),
            "get_median_ms": median_ms(gets),
        }
    finally:
        for p2p, node, _ in nodes:
            await node.shutdown()
            if node.cache_refresh_task is not None:
                node.cache_refresh_task.cancel()
            await p2p.shutdown()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--ops", type=int, default=30, help="store/get pairs per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heartbeat", type=float, default=5.0, help="peers' heartbeat in seconds (default: 5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rng = random.Random(args.seed)
    results = {}
    for n in args.sizes:
        ours = await bench_ours(n, args.ops, rng, args.heartbeat)
        anchor = await bench_anchor(n, args.ops, rng)
        results[str(n)] = {
            "ours": ours,
            "anchor_bare_hivemind": anchor,
            "ratio_join": round(ours["join_median_s"] / anchor["join_median_s"], 2),
            "ratio_store": round(ours["store_median_ms"] / anchor["store_median_ms"], 2),
            "ratio_get": round(ours["get_median_ms"] / anchor["get_median_ms"], 2),
            "goal_join_le_1s": ours["join_median_s"] <= 1.0,
            "goal_status_le_2s": ours["status_join_and_read_s"] <= 2.0,
            "status_complete": max(ours["status_members_seen"]) == n,
        }
        print(f"N={n} done", file=sys.stderr, flush=True)
    report = {"benchmark": "dht", "cpus": os.cpu_count(), "heartbeat_s": args.heartbeat, "sizes": results}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
