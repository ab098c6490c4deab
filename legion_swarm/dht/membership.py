"""Membership: the hello handshake with an entry peer, and the heartbeat that keeps a peer listed.

A member is a peer whose signed :class:`~legion_swarm.dht.records.PeerRecord` is alive in
``legion/<swarm>/peers``. It rewrites the record every ``heartbeat_s`` with an expiry of ``ttl_heartbeats``
beats (at least a beat plus two DHT timeouts), so a peer that dies vanishes within about three beats with
nobody deleting anything; a peer that shuts down cleanly writes ``state="left"`` so it vanishes at once from
views.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

from legion_swarm import __version__
from legion_swarm.config import MembershipConfig
from legion_swarm.dht.node import Found, SwarmDHT, dht_time
from legion_swarm.dht.records import Hardware, PeerRecord, peers_key
from legion_swarm.errors import LegionError, ProtocolError
from legion_swarm.transport.framing import read_message, write_message
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import short_peer_id

logger = logging.getLogger(__name__)

HELLO_PROTOCOL = "legion/hello/1"
HELLO_MAX_BYTES = 4096


@dataclass(frozen=True)
class Hello:
    """What an entry peer says about itself."""

    peer_id: str
    swarm: str
    version: str
    role: str
    config: bytes | None = None
    """SHA-256 of the swarm's signed training config, if the peer knows it: a joiner trusts this one."""


async def serve_hello(host: Host, swarm: str, role: str, extra: Callable[[], dict[str, object]] | None = None) -> None:
    """Answer ``HELLO_PROTOCOL`` streams with our swarm name, version and role (and ``extra()``'s fields)."""

    async def handle(stream_info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(read_message(reader, max_bytes=HELLO_MAX_BYTES), timeout=5)
            if not isinstance(request, dict):
                raise ProtocolError("hello request is not a map")
            fields = extra() if extra is not None else {}
            await write_message(writer, {**fields, "swarm": swarm, "version": __version__, "role": role})
        except (TimeoutError, ProtocolError, ConnectionError) as e:
            logger.info("[%s] bad hello from %s: %s", host.short_id, stream_info, e)
        finally:
            writer.close()

    await host.add_stream_handler(HELLO_PROTOCOL, handle)


async def say_hello(host: Host, peer_id: str, swarm: str | None, *, timeout: float) -> Hello:
    """Ask ``peer_id`` which swarm it serves; raise ``ProtocolError`` / ``TimeoutError`` on failure."""

    async def exchange() -> Hello:
        reader, writer = await host.open_stream(peer_id, HELLO_PROTOCOL)
        try:
            await write_message(writer, {"swarm": swarm, "version": __version__})
            reply = await read_message(reader, max_bytes=HELLO_MAX_BYTES)
        finally:
            writer.close()
        if not (isinstance(reply, dict) and all(isinstance(reply.get(k), str) for k in ("swarm", "version"))):
            raise ProtocolError(f"peer {short_peer_id(peer_id)} sent a malformed hello")
        config = reply.get("config")
        config = config if isinstance(config, bytes) and len(config) == 32 else None
        return Hello(peer_id, reply["swarm"], reply["version"], str(reply.get("role", "?")), config)

    return await asyncio.wait_for(exchange(), timeout)


def _gpu_name() -> str | None:
    """First GPU's model name without importing torch (NVIDIA's proc interface, else torch if loaded)."""
    for path in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return None


def detect_hardware() -> Hardware:
    """CPUs this process may use, total RAM in GiB, first GPU name."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram_gb = 0.0
    return Hardware(cpus=cpus, ram_gb=round(ram_gb, 1), gpu=_gpu_name())


class Membership:
    """Publishes this peer's record now and every heartbeat. Owned by a :class:`SwarmPeer`."""

    def __init__(
        self, dht: SwarmDHT, config: MembershipConfig, swarm: str, addrs: list[str],
        data: tuple[str, int] | None = None,
    ):  # fmt: skip
        self.dht = dht
        self.config = config
        self.key = peers_key(swarm)
        self.record = PeerRecord(
            swarm=swarm,
            peer_id=dht.host.peer_id,
            addrs=tuple(addrs),
            role=config.role,
            version=__version__,
            hardware=detect_hardware(),
            started_at=dht_time(),
            sent_at=dht_time(),
            data=data,
        )
        self.beats_ok = 0
        self.beats_failed = 0
        # A beat can take a DHT timeout or two when a replica just died, and a view read stalls the same way:
        # with short heartbeats, three beats would let every live record expire and each peer see itself alone.
        self.ttl_s = max(config.record_ttl_s, config.heartbeat_s + 2 * dht.config.wait_timeout_s)

    def update(self, **fields: object) -> None:
        """Change progress fields (step, loss, tokens_per_s, group, addrs); sent with the next beat."""
        self.record = replace(self.record, **fields)  # type: ignore[arg-type]

    async def publish(self, state: str = "alive") -> bool:
        now = dht_time()
        self.record = replace(self.record, sent_at=now, state=state)
        ok = await self.dht.store_own(self.key, self.record.to_wire(), now + self.ttl_s)
        if ok:
            self.beats_ok += 1
        else:
            self.beats_failed += 1
        return ok

    async def run(self) -> None:
        """Heartbeat loop; a failed beat is retried at the next one (the record outlives two misses)."""
        tag = short_peer_id(self.record.peer_id)
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                if not await self.publish():
                    logger.warning("[%s] heartbeat refused by the last replica asked; retrying next beat", tag)
            except (TimeoutError, LegionError, OSError) as e:
                logger.warning("[%s] heartbeat failed: %s", tag, e)

    async def leave(self) -> None:
        await self.publish(state="left")


async def read_members(dht: SwarmDHT, swarm: str) -> list[Found]:
    """Live members of ``swarm`` (departed ones dropped), bootstrap nodes first, then by peer id."""
    found = await dht.read_all(peers_key(swarm), PeerRecord)
    alive = [f for f in found.values() if f.record.state == "alive"]
    return sorted(alive, key=lambda f: (f.record.role != "bootstrap", f.record.peer_id))
