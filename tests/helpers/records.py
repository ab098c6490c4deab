"""A valid peer record on the wire, for tests that alter one field and look at what the parser says."""

from __future__ import annotations

from legion_swarm.dht.records import Hardware, PeerRecord


def make_record(**changes: object) -> dict:
    """The wire form of a plausible peer record, with ``changes`` applied on top (invalid ones included)."""
    record = PeerRecord(
        swarm="s",
        peer_id="QmPeer",
        addrs=("/ip4/127.0.0.1/tcp/1/p2p/QmPeer",),
        role="peer",
        version="0.1.0",
        hardware=Hardware(cpus=2, ram_gb=3.5, gpu=None),
        started_at=1.0,
        sent_at=2.0,
    ).to_wire()
    record.update(changes)
    return record
