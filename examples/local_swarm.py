"""Start a local swarm of real peer processes from Python, read its membership, shut it down.

    python examples/local_swarm.py --peers 3

In a notebook, drop ``asyncio.run`` and ``await main(3)`` directly: everything runs on the current loop.
"""

from __future__ import annotations

import argparse
import asyncio

from rich.console import Console

from legion_swarm import HostConfig, LocalSwarm, MembershipConfig, PeerConfig, SwarmPeer
from legion_swarm.cli.render import status_table


async def main(n_peers: int) -> int:
    async with await LocalSwarm.create(n_peers, swarm="example", peer_args=("--no-train",)) as swarm:
        entry = swarm.bootstrap.maddr
        print(f"bootstrap at {entry}")
        config = PeerConfig(
            host=HostConfig(host="127.0.0.1", client_mode=True, initial_peers=(entry,)),
            membership=MembershipConfig(swarm="example", role="observer"),
        )
        async with await SwarmPeer.create(config) as observer:
            for _ in range(100):  # records appear as peers finish joining
                view = await observer.view()
                if len(view.members) == n_peers + 1:
                    break
                await asyncio.sleep(0.1)
            Console().print(status_table(view))
            return len(view.members) - 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3)
    args = parser.parse_args()
    joined = asyncio.run(main(args.peers))
    raise SystemExit(0 if joined == args.peers else 1)
