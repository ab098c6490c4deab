"""The swarm's view of the Kademlia DHT: hivemind's ``DHTNode`` on our host, signed subkey records only.

Writers can only write their own subkey (see :mod:`legion_swarm.dht.validator`); readers get typed,
schema-checked records and silently lose nothing but malformed entries, which are logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from hivemind.dht import DHTNode
from hivemind.dht.routing import get_dht_time

from legion_swarm.config import DHTConfig
from legion_swarm.dht.records import Record, parse_record
from legion_swarm.dht.validator import SignedSubkeyValidator
from legion_swarm.errors import PeerUnreachableError, RecordError
from legion_swarm.transport.host import Host

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Found:
    """A record read from the DHT with its expiration (DHT time, seconds since the epoch)."""

    record: Record
    expires_at: float


class SwarmDHT:
    """A ``DHTNode`` bound to one :class:`Host`. Build with :meth:`create`, release with :meth:`aclose`."""

    def __init__(self, node: DHTNode, host: Host, config: DHTConfig):
        self.node = node
        self.host = host
        self.config = config
        self._seen: dict[str, dict[str, Found]] = {}  # key -> owner -> latest unexpired record read

    @classmethod
    async def create(cls, host: Host, config: DHTConfig) -> SwarmDHT:
        initial = list(host.config.initial_peers)
        try:
            node = await DHTNode.create(
                p2p=host.p2p,
                initial_peers=initial or None,
                client_mode=host.config.client_mode,
                record_validator=SignedSubkeyValidator(host.identity),
                wait_timeout=config.wait_timeout_s,
                num_replicas=config.num_replicas,
                bucket_size=config.bucket_size,
            )
        except RuntimeError as e:  # hivemind: "DHTNode bootstrap failed: none of the initial_peers responded"
            raise PeerUnreachableError(f"no initial peer answered DHT pings: {', '.join(initial)}") from e
        return cls(node, host, config)

    async def store_own(self, key: str, record: dict[str, Any], expires_at: float) -> bool:
        """Write ``record`` under ``key`` at this peer's own subkey.

        Returns once the first replica has answered (True if it accepted); the other replicas are
        written in the background, so a heartbeat costs one round trip of latency, not the slowest.
        """
        stored = await self.node.store(key, record, expires_at, subkey=self.host.peer_id, await_all_replicas=False)
        return bool(stored)

    async def read_all(self, key: str, kind: type[Record]) -> dict[str, Found]:
        """All live, valid records of type ``kind`` under ``key`` by owner peer id (latest version of each).

        One DHT read can miss records (replicas that timed out are skipped for a while), so the result is
        merged with what earlier reads returned: a reader never forgets a record before it expires.
        """
        result = await self.node.get(key, latest=True)
        fresh = self._parse(key, result.value if result is not None else None, kind)
        merged = merge_records(self._seen.get(key, {}), fresh, get_dht_time())
        self._seen[key] = merged
        return dict(merged)

    @staticmethod
    def _parse(key: str, value: Any, kind: type[Record]) -> dict[str, Found]:
        if not isinstance(value, dict):
            return {}
        now = get_dht_time()
        found: dict[str, Found] = {}
        for owner, item in value.items():
            if item.expiration_time <= now:
                continue
            try:
                record = parse_record(item.value)
                if record.peer_id != owner:
                    raise RecordError("peer_id field differs from the subkey")
                if not isinstance(record, kind):
                    raise RecordError(f"a {record.kind} record where {kind.kind} records belong")
                if record.swarm != expected_swarm(key):
                    raise RecordError(f"record of swarm {record.swarm!r} under another swarm's key")
            except RecordError as e:
                logger.warning("ignoring malformed record under %s/%s: %s", key, str(owner)[:16], e)
                continue
            found[owner] = Found(record, item.expiration_time)
        return found

    async def aclose(self) -> None:
        try:
            await self.node.shutdown()
        finally:
            # DHTNode.shutdown leaves its cache-refresh task waiting forever; it belongs to us to end.
            task = self.node.cache_refresh_task
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def merge_records(seen: dict[str, Found], fresh: dict[str, Found], now: float) -> dict[str, Found]:
    """Union of two reads: per owner the record that expires last, dropping every expired one.

    Records are soft state with their own expiry, so a record read earlier and not yet expired is as
    valid as one read now; a newer write (a later heartbeat, a departure notice) always expires later.
    """
    merged = {owner: f for owner, f in seen.items() if f.expires_at > now}
    for owner, f in fresh.items():
        if f.expires_at > now and (owner not in merged or f.expires_at > merged[owner].expires_at):
            merged[owner] = f
    return merged


def expected_swarm(key: str) -> str:
    """The swarm a ``legion/<swarm>/...`` key belongs to."""
    return key.split("/", 2)[1] if key.count("/") >= 2 else ""


dht_time = get_dht_time
"""Current DHT time (Unix seconds); nodes whose clocks differ by more than 3 s reject each other's records."""
