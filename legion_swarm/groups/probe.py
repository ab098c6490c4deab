"""RTT probing: members ping a bounded sample of each other and publish the medians in the DHT.

**Ping** (``legion/ping/1``): the prober opens one libp2p stream and makes ``repeats + 1`` request/response
exchanges on it, each a tiny length-prefixed msgpack frame (:mod:`legion_swarm.transport.framing`)::

    → {"ping": seq, "of": repeats + 1}      ← {"pong": seq}          for seq = 0 .. repeats

Exchange 0 is a warm-up and is not timed: it also waits for the far side to start its stream handler (measured on
loopback, two runs: 0.7-1.1 ms against 0.35-0.46 ms for a later exchange; opening the stream takes 0.9-1.2 ms
more, untimed too). The other ``repeats``
are timed one by one, and their median is the result, so one slow exchange (a scheduler hiccup, a lost packet)
does not move it. The server answers exactly ``of`` (at most ``MAX_REPEATS + 1``) pings and closes the stream;
frames are capped at ``PING_MAX_BYTES`` and every wait is bounded. Either side rejects a frame that is not the
next expected one, saying why in the log.

**Prober** (one per member, owned by its :class:`~legion_swarm.peer.SwarmPeer`): every ``interval_s`` it reads
the member list, picks its targets with :func:`select_targets` (the ``sample // 2`` peers it measured closest,
kept for stability, plus random others so it keeps exploring), pings them ``concurrency`` at a time, keeps the
medians of live peers that answered and are younger than ``ttl_intervals`` intervals, and publishes them as its
signed :class:`~legion_swarm.dht.records.RttRecord` under ``legion/<swarm>/rtt``, expiring ``ttl_intervals``
intervals later. Readers get every member's record with :func:`read_rtts` and complete the sparse view into a
matrix with :func:`rtt_matrix`.

**How it scales** with n members, sample s, repeats r and ttl_intervals t. Per peer per interval: min(s, n - 1)
pings of r + 1 round trips of ~20-byte frames, i.e. O(s · r) messages, independent of n; one DHT read of the member
list (the same read as any view of the swarm) and one DHT write of a record with at most min(s · t, 64) entries
(~60 bytes each: ≤ 4 kB). Swarm-wide: n records and about n · s measured pairs per interval, so a peer is measured
by ~2s others on average (it pings s and is pinged by s), the matrix holds O(n · s) of its n² pairs, and a reader
of the RTT key (the round's leader, ``status``) fetches O(n · s · t) numbers (n = 1000, s = 8, t = 3: ~1.5 MB,
under the DHT's ~4 MiB per-key limit up to ~2500 peers at that density). Clustering does not need the missing pairs
measured: :meth:`~legion_swarm.groups.clustering.RttMatrix.from_measurements` estimates each one from the triangle
inequality (the lower bound |rtt(i, k) - rtt(j, k)| once ``MIN_WITNESSES`` third peers measured both, else the
shortest relay path through measured pairs) at O(n² · d) for mean degree d ≈ 2s. Keeping the nearest peers in
every sample is what makes that work: each peer's closest neighbours stay measured (the pairs a group is made of),
while the random half of the sample finds nearer peers over time and supplies the cross-region witnesses that
keep regions apart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import statistics
import time
from collections.abc import Collection, Mapping, Sequence

from legion_swarm.config import ProbeConfig
from legion_swarm.dht.membership import read_members
from legion_swarm.dht.node import SwarmDHT, dht_time
from legion_swarm.dht.records import MAX_RTT_ENTRIES, RttRecord, rtt_key
from legion_swarm.errors import ProtocolError
from legion_swarm.groups.clustering import RttMatrix
from legion_swarm.transport.framing import read_message, write_message
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import short_peer_id

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_REPEATS",
    "PING_PROTOCOL",
    "Prober",
    "ping",
    "read_rtts",
    "rtt_matrix",
    "select_targets",
    "serve_ping",
]

PING_PROTOCOL = "legion/ping/1"
PING_MAX_BYTES = 64
"""Largest ping or pong frame accepted (a real one is ~20 bytes)."""
MAX_REPEATS = 32
"""Most timed exchanges of one ping (``ProbeConfig.repeats`` is checked against the same bound)."""


# ------------------------------------------------------------------------------------------------ the protocol


async def serve_ping(host: Host, *, timeout_s: float) -> None:
    """Answer ``PING_PROTOCOL`` streams: ``of`` pongs per stream, each request awaited at most ``timeout_s``."""

    async def handle(stream_info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            expected = 0
            total = 1
            while expected < total:
                request = await asyncio.wait_for(read_message(reader, max_bytes=PING_MAX_BYTES), timeout_s)
                seq = request.get("ping") if isinstance(request, dict) else None
                count = request.get("of") if isinstance(request, dict) else None
                if type(seq) is not int or type(count) is not int or seq != expected:
                    raise ProtocolError(f"expected ping {expected}, got {request!r:.60}")
                if not 1 <= count <= MAX_REPEATS + 1 or (expected and count != total):
                    raise ProtocolError(f"bad ping count {count!r}")
                total = count
                await write_message(writer, {"pong": seq})
                expected += 1
        except (TimeoutError, ProtocolError, ConnectionError) as e:
            logger.info("[%s] ping stream from %s dropped: %r", host.short_id, stream_info, e)
        finally:
            writer.close()

    await host.add_stream_handler(PING_PROTOCOL, handle)


async def ping(host: Host, peer_id: str, *, repeats: int, timeout: float, maddrs: Sequence[str] = ()) -> float:
    """Median RTT to ``peer_id`` in milliseconds over ``repeats`` timed exchanges on one stream (after a warm-up).

    ``maddrs``: the peer's published addresses, dialled first so that the daemon need not look it up. Raises
    :class:`~legion_swarm.errors.PeerUnreachableError` if it cannot be reached, :class:`ProtocolError` if it does
    not serve ``PING_PROTOCOL`` or answers garbage, ``TimeoutError`` past ``timeout`` seconds (all of it: dial,
    stream setup and exchanges).
    """
    if not 1 <= repeats <= MAX_REPEATS:
        raise ValueError(f"repeats must be in [1, {MAX_REPEATS}], got {repeats}")
    tag = short_peer_id(peer_id)
    async with asyncio.timeout(timeout):
        if maddrs:
            await host.connect(peer_id, maddrs)
        reader, writer = await host.open_stream(peer_id, PING_PROTOCOL)
        rtts_ms = []
        try:
            for seq in range(repeats + 1):
                started = time.perf_counter()
                await write_message(writer, {"ping": seq, "of": repeats + 1})
                reply = await read_message(reader, max_bytes=PING_MAX_BYTES)
                elapsed = time.perf_counter() - started
                if not (isinstance(reply, dict) and type(reply.get("pong")) is int and reply["pong"] == seq):
                    raise ProtocolError(f"peer {tag} answered ping {seq} with {reply!r:.60}")
                if seq:  # exchange 0 also waited for the far side's handler to start
                    rtts_ms.append(elapsed * 1000.0)
        finally:
            writer.close()
    return statistics.median(rtts_ms)


# ------------------------------------------------------------------------------------------ whom to ping (pure)


def select_targets(
    members: Collection[str], medians: Mapping[str, float], *, me: str, sample: int, rng: random.Random
) -> list[str]:
    """The peers to ping this round: at most ``sample`` of ``members``, never ``me``.

    The ``sample // 2`` members with the smallest finite ``medians`` (last measurements; ties by peer id) are kept,
    so the pairs groups are made of stay measured; the other places go to members drawn with ``rng`` from the
    rest, so the prober keeps exploring and finds nearer peers. Peers in ``medians`` but no longer in ``members``
    (departed) are never picked. Deterministic for a given ``rng`` state, whatever the order of ``members``.
    Returns the kept peers nearest first, then the explored ones.
    """
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    others = sorted(set(members) - {me})
    if len(others) <= sample:
        return others
    present = set(others)
    known = sorted((ms, p) for p, ms in medians.items() if p in present and math.isfinite(ms))
    kept = [p for _, p in known[: sample // 2]]
    chosen = set(kept)
    rest = [p for p in others if p not in chosen]
    return kept + rng.sample(rest, sample - len(kept))


# -------------------------------------------------------------------------------------------- reading the view


async def read_rtts(dht: SwarmDHT, swarm: str) -> dict[str, dict[str, float]]:
    """Every live RTT record of ``swarm``: prober peer id -> {measured peer id -> median RTT in ms}."""
    found = await dht.read_all(rtt_key(swarm), RttRecord)
    return {owner: dict(f.record.rtts) for owner, f in found.items() if isinstance(f.record, RttRecord)}


def rtt_matrix(measurements: Mapping[str, Mapping[str, float]], members: Collection[str]) -> RttMatrix:
    """The complete RTT matrix over ``members`` from the records of :func:`read_rtts`: measurements by or about
    peers outside ``members`` (departed, observers) are ignored, missing pairs are estimated."""
    return RttMatrix.from_measurements(measurements, members)


# ----------------------------------------------------------------------------------------------------- prober


class Prober:
    """Measures and publishes this member's RTTs every ``config.interval_s``. Owned by a :class:`SwarmPeer`.

    ``seed`` makes the random half of every sample reproducible (tests); None draws it from the OS.
    """

    def __init__(self, dht: SwarmDHT, swarm: str, config: ProbeConfig, *, seed: int | None = None):
        self.dht = dht
        self.host = dht.host
        self.swarm = swarm
        self.config = config
        self.key = rtt_key(swarm)
        self.rng = random.Random(seed)
        self.measured: dict[str, tuple[float, float]] = {}
        """Peer id -> (median RTT in ms, ``time.monotonic()`` of the measurement): what the next record says."""
        self.rounds = 0
        """Probe rounds completed (whether or not every ping answered)."""
        self.published = 0
        """Records accepted by the DHT."""

    @property
    def medians(self) -> dict[str, float]:
        """Peer id -> latest median RTT in ms."""
        return {p: ms for p, (ms, _) in self.measured.items()}

    async def probe_once(self) -> dict[str, float]:
        """One round: read the members, ping a sample, update and publish the medians; return them."""
        tag = self.host.short_id
        found = await read_members(self.dht, self.swarm)
        addrs = {f.record.peer_id: f.record.addrs for f in found}
        targets = select_targets(addrs, self.medians, me=self.host.peer_id, sample=self.config.sample, rng=self.rng)
        results: dict[str, float | None] = {}
        limit = asyncio.Semaphore(self.config.concurrency)

        async def measure(peer_id: str) -> None:
            async with limit:
                try:
                    results[peer_id] = await ping(
                        self.host, peer_id, repeats=self.config.repeats, timeout=self.config.timeout_s,
                        maddrs=addrs[peer_id],
                    )  # fmt: skip
                except ProtocolError as e:
                    logger.info("[%s] ping to %s rejected: %s", tag, short_peer_id(peer_id), e)
                    results[peer_id] = None
                except Exception as e:  # unreachable, timed out, left: a failed measurement, not a failed round
                    logger.debug("[%s] ping to %s failed: %r", tag, short_peer_id(peer_id), e)
                    results[peer_id] = None

        async with asyncio.TaskGroup() as tasks:
            for peer_id in targets:
                tasks.create_task(measure(peer_id), name=f"ping-{short_peer_id(peer_id)}")
        now = time.monotonic()
        for peer_id, ms in results.items():
            if ms is None:
                self.measured.pop(peer_id, None)  # gone or broken: an old value would mislead the grouping
            else:
                self.measured[peer_id] = (ms, now)
        fresh_after = now - self.config.record_ttl_s
        kept = [(t, p, ms) for p, (ms, t) in self.measured.items() if p in addrs and t > fresh_after]
        kept.sort(key=lambda item: (-item[0], item[2], item[1]))  # newest first, then nearest
        self.measured = {p: (ms, t) for t, p, ms in kept[:MAX_RTT_ENTRIES]}
        self.rounds += 1
        answered = sum(ms is not None for ms in results.values())
        logger.debug("[%s] probe round %d: %d/%d answered", tag, self.rounds, answered, len(targets))
        if self.measured or self.published:  # an empty record replaces stale values once nobody answers
            await self.publish()
        return self.medians

    async def publish(self) -> bool:
        sent_at = dht_time()
        rtts = {p: round(ms, 3) for p, ms in self.medians.items()}
        record = RttRecord(swarm=self.swarm, peer_id=self.host.peer_id, sent_at=sent_at, rtts=rtts)
        ok = await self.dht.store_own(self.key, record.to_wire(), sent_at + self.config.record_ttl_s)
        if ok:
            self.published += 1
        else:
            logger.warning("[%s] RTT record refused by the last replica asked; retrying next round", self.host.short_id)
        return ok

    async def run(self) -> None:
        """Probe rounds forever, the first ``first_delay_s`` after the start; a failed round is retried at the
        next one (the previous record outlives ``ttl_intervals - 1`` missed rounds)."""
        await asyncio.sleep(self.config.first_delay_s)
        while True:
            started = time.monotonic()
            try:
                await self.probe_once()
            except Exception as e:  # a DHT read or write failed: the next round tries again
                logger.warning("[%s] probe round failed: %r", self.host.short_id, e)
            await asyncio.sleep(max(0.0, self.config.interval_s - (time.monotonic() - started)))
