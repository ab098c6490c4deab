"""Data-shard leases: which peer reads which shard, agreed through the DHT, with work stealing.

**Protocol.** The training data is cut into ``num_shards`` shards. Every peer publishes one signed
:class:`~legion_swarm.dht.records.LeaseRecord` under ``leases_key(swarm)`` at its own subkey, listing the
shards it claims as ``(shard, since, position)``; the record's DHT expiration is the lease expiry. To take
a shard, a peer picks a free one (:func:`choose_shards`), writes a claim stamped ``since = dht_time()``,
waits ``settle_s``, re-reads every record and keeps the shard only if :func:`arbitrate` says it won
(among unexpired claims the earliest ``since`` wins, ties go to the smaller peer id); otherwise it
withdraws the claim and tries another shard. Every ``renew_s`` a peer rewrites its record (expiry
``ttl_s`` later, with its current positions), re-reads, and drops any shard on which an earlier claim has
become visible. A peer that dies stops renewing: its record expires ``ttl_s`` after its last write and
its shards come free, and a thief continues from the ``position`` it last saw published (work stealing).
A clean :meth:`ShardLeases.release` writes a newer record without the shard, which replaces the old one at
once (for one owner the record that expires last wins everywhere). The earliest-claim rule means an
incumbent is never displaced by a newcomer that failed to see it: the newcomer is the one that yields.

**Guarantees.** The arbitration is a pure function of the records seen, so peers that see the same
records agree on every holder. Two live peers hold the same shard at the same time only if one of them
did not see the other's earlier claim: its re-read came ``settle_s`` after its own write and still missed
a claim stamped before it — which needs a write slower than ``settle_s`` minus the clock skew between the
two (DHT nodes refuse peers more than 3 s apart), lost replicas, or a partition. Such an overlap ends at
the first renewal of the later claimant after the earlier claim becomes visible to it; the trainer learns
through :meth:`ShardLeases.still_holds`, :meth:`ShardLeases.update_position` returning ``False``, or the
``on_lost`` callback. A peer whose renewals are refused or late gives its shards up locally
``safety_margin_s`` before its lease expires for others, so it stops reading before anyone may take the
shard over (for clock skew below that margin). hivemind counts a node's own storage as one of the
replicas, though, so a peer cut off from every other node still renews "successfully" into its own storage
and keeps its shards: that is the partition case. Under a partition each side sees the other side's leases
expire and takes their shards — leases favour availability, and the same batches may be trained on both
sides; when the partition heals the earliest claim wins, so the incumbent keeps each shard and the peer
that took it over yields at its next renewal. Leases never block training: a swarm with more peers than
shards leaves some peers without one (:meth:`ShardLeases.acquire` returns ``None``).

**Positions.** A record that expired is gone from the DHT, so the position a thief resumes from is the
one it remembers from its own latest read of the previous holder's record (every renewal and every
acquire poll reads). The holder publishes its position at each renewal, so the batches it trained in its
last ``renew_s`` (more if the thief read less recently) are trained again. A peer that never read the
holder's record (it joined after the record expired) starts that shard at 0.

**Costs.** Per peer holding a shard: one DHT write and one DHT read every ``renew_s`` (plus a second write
when a shard was lost). Per acquisition: one read, one write, ``settle_s`` of waiting, one read (and a
withdrawal write per lost race), and one read per ``poll_s`` while waiting. A peer holding nothing and
not acquiring costs nothing. A replica that stopped answering delays one renewal by up to two DHT request
timeouts before hivemind blacklists it, which is why :meth:`ShardLeases.create` wants
``2 × wait_timeout_s < safety_margin_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

from legion_swarm.config import DHTConfig
from legion_swarm.dht.node import Found, SwarmDHT, dht_time
from legion_swarm.dht.records import MAX_LEASES, Lease, LeaseRecord, leases_key
from legion_swarm.errors import ConfigError
from legion_swarm.transport.identity import short_peer_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LeaseConfig:
    """How a peer leases data shards. Peers of one swarm must agree on ``num_shards``."""

    num_shards: int
    """Shards the training data is cut into; shard ids are ``0 .. num_shards - 1``."""
    shards_per_peer: int = 1
    """Most shards one peer holds at once; :meth:`ShardLeases.acquire` takes no more."""
    renew_s: float = 5.0
    """Seconds between rewrites of this peer's lease record (and re-checks of the shards it holds)."""
    ttl_s: float = 20.0
    """A lease expires this long after its last write: a dead peer's shards come free after about this."""
    settle_s: float = 1.0
    """Wait between writing a claim and re-reading to check it: how late a rival claim may arrive unseen."""
    acquire_timeout_s: float = 30.0
    """How long :meth:`ShardLeases.acquire` waits for a shard to come free before returning ``None``."""
    poll_s: float = 1.0
    """Seconds between looks for a free shard while every shard is held."""
    max_attempts: int = 8
    """Failed attempts (a rival's earlier claim won, a DHT request timed out) one ``acquire`` call accepts."""

    def __post_init__(self) -> None:
        for name in ("num_shards", "shards_per_peer", "max_attempts"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.shards_per_peer > MAX_LEASES:
            raise ConfigError(f"shards_per_peer must be <= {MAX_LEASES} (one record holds that many leases)")
        for name in ("renew_s", "ttl_s", "settle_s", "acquire_timeout_s", "poll_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ttl_s < 2 * self.renew_s:
            raise ConfigError(
                f"ttl_s ({self.ttl_s}) must be >= 2 × renew_s ({self.renew_s}), or one late renewal loses the lease"
            )
        if self.settle_s > self.renew_s:
            raise ConfigError(f"settle_s ({self.settle_s}) must be <= renew_s ({self.renew_s})")

    def check_against(self, dht: DHTConfig) -> None:
        """Raise :class:`ConfigError` if a dead replica (two DHT request timeouts) could delay a renewal past
        the point where a peer gives its shards up."""
        if 2 * dht.wait_timeout_s >= self.safety_margin_s:
            raise ConfigError(
                f"2 × dht wait_timeout_s ({dht.wait_timeout_s}) must be < (ttl_s - renew_s) / 2 "
                f"({self.safety_margin_s}): a renewal that waits out one dead replica would lapse the lease"
            )

    @property
    def safety_margin_s(self) -> float:
        """How long before its lease expires for others a peer that could not renew gives its shards up."""
        return (self.ttl_s - self.renew_s) / 2


@dataclass(frozen=True)
class Holder:
    """The peer whose claim on a shard won arbitration, its lease, and when that lease expires (DHT time)."""

    peer_id: str
    lease: Lease
    expires_at: float


def _rank(holder: Holder) -> tuple[float, str]:
    return holder.lease.since, holder.peer_id


def arbitrate(records: Mapping[str, Found], now: float) -> dict[int, Holder]:
    """Holder of every claimed shard: among unexpired claims, the earliest ``since``; ties to the smaller id.

    ``records`` maps owner peer id to that owner's latest lease record (as :meth:`SwarmDHT.read_all` returns
    it). A record that expired by ``now`` (DHT time) claims nothing; so does one under a foreign owner.
    Pure and independent of iteration order: peers that see the same records agree on every holder.
    """
    holders: dict[int, Holder] = {}
    for owner, found in records.items():
        record = found.record
        if found.expires_at <= now or not isinstance(record, LeaseRecord) or record.peer_id != owner:
            continue
        for lease in record.leases:
            claim = Holder(owner, lease, found.expires_at)
            best = holders.get(lease.shard)
            if best is None or _rank(claim) < _rank(best):
                holders[lease.shard] = claim
    return holders


def rendezvous_score(peer_id: str, shard: int) -> int:
    """A 64-bit pseudo-random weight of ``(peer_id, shard)``, the same in every process.

    Each peer prefers the free shards it scores highest, so peers starting together mostly go for
    different shards (rendezvous hashing) and a peer's preference does not change as others come and go.
    """
    digest = hashlib.blake2b(f"{peer_id}/{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose_shards(
    holders: Mapping[int, Holder],
    *,
    num_shards: int,
    peer_id: str,
    target: int,
    positions: Mapping[int, int] | None = None,
    exclude: Collection[int] = (),
) -> list[int]:
    """Free shards ``peer_id`` should claim next, best first, to hold ``target`` shards; ``[]`` if none.

    A shard is free if nobody holds it and it is not in ``exclude``. The lowest known position goes first:
    this module does not know shard lengths, so the least-read shard is the one with the most data left;
    reading it keeps the swarm's progress even across shards, and exhausted shards are only taken once
    nothing else is free (the trainer then decides whether a new epoch starts). Among equal positions a
    peer takes the shard of highest :func:`rendezvous_score`, which spreads peers over shards.
    """
    mine = sum(1 for h in holders.values() if h.peer_id == peer_id)
    wanted = target - mine
    if wanted <= 0:
        return []
    known = positions or {}
    skip = set(exclude)
    free = [s for s in range(num_shards) if s not in holders and s not in skip]
    free.sort(key=lambda s: (known.get(s, 0), -rendezvous_score(peer_id, s), s))
    return free[:wanted]


class ShardLeases:
    """This peer's data-shard leases. Build with :meth:`create`, release with :meth:`aclose`.

    ::

        leases = await ShardLeases.create(peer.dht, peer.swarm, LeaseConfig(num_shards=64))
        shard = await leases.acquire()            # None: no shard came free in time
        start = leases.position(shard)            # continue where the previous holder stopped
        ...
        if not leases.update_position(shard, n):  # after each batch; False: the shard was lost
            ...
        await leases.release(shard)
        await leases.aclose()
    """

    def __init__(self, dht: SwarmDHT, swarm: str, config: LeaseConfig, on_lost: Callable[[int], None] | None = None):
        self.dht = dht
        self.config = config
        self.key = leases_key(swarm)
        self.swarm = swarm
        self.peer_id = dht.host.peer_id
        self.tag = short_peer_id(self.peer_id)
        self.on_lost = on_lost
        """Called with the shard id, from the renewal, when this peer loses a shard it held; must not raise."""
        self._claims: dict[int, Lease] = {}  # what our record claims: held shards and pending claims
        self._held: set[int] = set()  # claims that won arbitration and were not lost since
        self._positions: dict[int, int] = {}  # shard -> last position seen in its holder's record (or ours)
        self._valid_until = 0.0  # DHT time: expiry of our last record the DHT accepted
        self._last_expiry = 0.0
        self._stale = False  # the DHT may still hold claims we dropped: the next renewal must write
        self._lock = asyncio.Lock()  # one writer at a time, so expiries of our writes only grow
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def create(
        cls, dht: SwarmDHT, swarm: str, config: LeaseConfig, *, on_lost: Callable[[int], None] | None = None
    ) -> ShardLeases:
        """Start the renewal task; nothing is claimed until :meth:`acquire`.

        Raises :class:`ConfigError` if ``config`` does not fit the DHT's timeouts (:meth:`LeaseConfig.check_against`).
        """
        config.check_against(dht.config)
        self = cls(dht, swarm, config, on_lost)
        self._task = asyncio.create_task(self._renew_loop(), name=f"leases-{self.tag}")
        return self

    @property
    def held(self) -> frozenset[int]:
        """Shards this peer holds now (won and not lost or lapsed)."""
        return frozenset(s for s in self._held if self.still_holds(s))

    @property
    def expires_at(self) -> float:
        """DHT time at which our lease ends for other peers unless renewed (0 before the first write)."""
        return self._valid_until

    @property
    def positions(self) -> dict[int, int]:
        """Last known position of every shard this peer has seen held (its own ones up to date)."""
        return dict(self._positions)

    def still_holds(self, shard: int) -> bool:
        """True while ``shard`` is ours: no earlier claim seen, and our lease not about to expire for others."""
        return shard in self._held and dht_time() < self._valid_until - self.config.safety_margin_s

    def position(self, shard: int) -> int:
        """Where reading ``shard`` continues: our position if we hold it, else the last one seen, else 0."""
        lease = self._claims.get(shard)
        return lease.position if lease is not None else self._positions.get(shard, 0)

    def update_position(self, shard: int, position: int) -> bool:
        """Record that ``position`` batches of ``shard`` are trained (published with the next renewal).

        Returns False, changing nothing, if this peer no longer holds ``shard``.
        """
        if not (isinstance(position, int) and position >= 0):
            raise ValueError(f"position must be an integer >= 0, got {position!r}")
        if not self.still_holds(shard):
            return False
        self._claims[shard] = replace(self._claims[shard], position=position)
        self._positions[shard] = position
        return True

    async def holders(self) -> dict[int, Holder]:
        """Read every lease record and arbitrate: the holder of each held shard (for status displays).

        Raises ``TimeoutError`` if the DHT does not answer within ``safety_margin_s``.
        """
        found = await asyncio.wait_for(self.dht.read_all(self.key, LeaseRecord), self.config.safety_margin_s)
        now = dht_time()
        # Our own claims are known here first-hand; a read that missed our latest write must not decide.
        found[self.peer_id] = Found(self._record(now), self._valid_until)
        holders = arbitrate(found, now)
        for shard, holder in holders.items():
            if holder.peer_id != self.peer_id:
                self._positions[shard] = holder.lease.position
        return holders

    async def acquire(self, *, exclude: Collection[int] = (), timeout: float | None = None) -> int | None:
        """Claim a free shard and return it once it is ours; ``None`` if none could be had.

        Waits up to ``timeout`` (default ``acquire_timeout_s``) for a shard to come free, polling every
        ``poll_s``. Returns ``None`` at once if this peer already holds ``shards_per_peer`` shards, and
        after ``max_attempts`` failed attempts (lost races, DHT requests that timed out). ``exclude``:
        shards not to take (e.g. ones the trainer finished).
        """
        deadline = time.monotonic() + (self.config.acquire_timeout_s if timeout is None else timeout)
        failures = 0
        while len(self._claims) < self.config.shards_per_peer:
            failed = False
            try:
                holders = await self.holders()
                choice = choose_shards(
                    holders, num_shards=self.config.num_shards, peer_id=self.peer_id,
                    target=self.config.shards_per_peer, positions=self._positions, exclude={*exclude, *self._claims},
                )  # fmt: skip
                if choice:
                    if await self._try_claim(choice[0]):
                        return choice[0]
                    failed = True
            except TimeoutError:  # a claim in flight was withdrawn locally; the next write withdraws it remotely
                logger.info("[%s] a DHT request timed out while acquiring a shard", self.tag)
                failed = True
            if failed:
                failures += 1
                if failures >= self.config.max_attempts:
                    logger.info("[%s] gave up acquiring a shard after %d failed attempts", self.tag, failures)
                    return None
                # Retry at once: the re-read that lost the race already shows the winner's claim.
            elif time.monotonic() + self.config.poll_s > deadline:
                logger.info("[%s] no shard came free within the acquire timeout", self.tag)
                return None
            else:
                await asyncio.sleep(self.config.poll_s)
            if time.monotonic() > deadline:
                return None
        return None

    async def _try_claim(self, shard: int) -> bool:
        """Write a claim on ``shard``, let rival claims arrive, and keep it only if arbitration says so."""
        lease = Lease(shard=shard, since=dht_time(), position=self._positions.get(shard, 0))
        won = False
        try:
            async with self._lock:
                self._claims[shard] = lease
                stored = await self._publish()
            if stored:
                await asyncio.sleep(self.config.settle_s)
                holder = (await self.holders()).get(shard)
                won = holder is not None and holder.peer_id == self.peer_id and self._claims.get(shard) is lease
                if holder is not None and holder.peer_id != self.peer_id:
                    rival = short_peer_id(holder.peer_id)
                    logger.debug("[%s] lost the race for shard %d to %s", self.tag, shard, rival)
        finally:
            if not won and self._claims.get(shard) is lease:
                # Cancelled or failed too: the withdrawal goes out with the next write (renew writes if stale).
                del self._claims[shard]
                self._stale = True
        if not won:
            async with self._lock:
                if self._stale:
                    await self._publish()
            return False
        self._held.add(shard)
        logger.info("[%s] acquired shard %d at position %d", self.tag, shard, lease.position)
        return True

    async def release(self, shard: int) -> bool:
        """Give ``shard`` up now. Returns whether the DHT took the release at once (else the next renewal
        rewrites it); False also if ``shard`` was not ours."""
        async with self._lock:
            if self._claims.pop(shard, None) is None:
                return False
            self._held.discard(shard)
            self._stale = True
            try:
                stored = await self._publish()
            except TimeoutError:
                stored = False
        logger.info("[%s] released shard %d at position %d", self.tag, shard, self._positions.get(shard, 0))
        return stored

    async def renew(self) -> frozenset[int]:
        """Rewrite our record now, re-read, and drop shards an earlier claim won; return the shards lost.

        The renewal task calls this every ``renew_s``; call it directly to publish positions at once.
        """
        lost: dict[int, str] = {}
        try:
            async with self._lock:
                if not self._claims and not self._stale:
                    return frozenset()
                for shard in list(self._held):
                    if not self.still_holds(shard):
                        lost[shard] = "its lease lapsed (renewals failed)"
                self._drop(lost)
                await self._publish()
                holders = await self.holders()
                for shard in list(self._held):
                    holder = holders.get(shard)
                    if holder is None or holder.peer_id != self.peer_id:
                        who = short_peer_id(holder.peer_id) if holder is not None else "nobody"
                        lost[shard] = f"an earlier claim by {who} became visible"
                if self._drop(lost):
                    await self._publish()
        finally:  # a lapsed shard is reported even when the DHT write that follows fails
            for shard, why in sorted(lost.items()):
                logger.warning("[%s] lost shard %d: %s", self.tag, shard, why)
                if self.on_lost is not None:
                    self.on_lost(shard)
        return frozenset(lost)

    def _drop(self, shards: Collection[int]) -> bool:
        dropped = False
        for shard in shards:
            if self._claims.pop(shard, None) is not None:
                dropped = True
            self._held.discard(shard)
        self._stale = self._stale or dropped
        return dropped

    def _record(self, now: float) -> LeaseRecord:
        leases = tuple(self._claims[s] for s in sorted(self._claims))
        return LeaseRecord(swarm=self.swarm, peer_id=self.peer_id, sent_at=now, leases=leases)

    async def _publish(self) -> bool:
        """Write our claims (caller holds the lock). Returns whether the first replica accepted the write;
        raises ``TimeoutError`` if the DHT did not answer within ``safety_margin_s``."""
        now = dht_time()
        # Replicas keep, per owner, the record that expires last: each write must expire after the previous.
        expires_at = max(now + self.config.ttl_s, self._last_expiry + 1e-3)
        self._last_expiry = expires_at
        record = self._record(now)
        self._stale = True  # until this write is known to have landed
        stored = await asyncio.wait_for(
            self.dht.store_own(self.key, record.to_wire(), expires_at), self.config.safety_margin_s
        )
        if stored:
            self._valid_until = expires_at
            self._stale = False
        else:
            logger.warning("[%s] lease record refused by the first replica; rewriting at the next renewal", self.tag)
        return stored

    async def _renew_loop(self) -> None:
        next_at = time.monotonic() + self.config.renew_s
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + self.config.renew_s, time.monotonic())  # fixed rate, no burst after a stall
            try:
                await asyncio.wait_for(self.renew(), self.config.ttl_s)
            except Exception as e:  # a missed renewal is retried; repeated misses end as lapsed leases
                logger.warning("[%s] lease renewal failed: %r", self.tag, e)

    async def aclose(self) -> None:
        """Stop renewing and release every shard (best effort, bounded by ``safety_margin_s``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not (self._claims or self._stale):
            return
        shards = sorted(self._claims)

        async def release_all() -> None:
            async with self._lock:
                self._claims.clear()
                self._held.clear()
                await self._publish()

        try:
            await asyncio.wait_for(release_all(), self.config.safety_margin_s)
        except Exception as e:  # the leases then expire by themselves within ttl_s
            logger.info("[%s] release of shards %s not stored: %r", self.tag, shards, e)

    async def __aenter__(self) -> ShardLeases:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
