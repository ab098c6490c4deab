"""The peer's own settings: how its libp2p host listens and dials, the DHT, membership records and RTT
probing. Validation is pure Python (no hivemind import), so a bad flag fails fast with a
:class:`~legion_swarm.errors.ConfigError` before any daemon starts.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from legion_swarm.errors import ConfigError

SWARM_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_BASE58_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")
DEFAULT_SWARM = "legion"
DEFAULT_BOOTSTRAP_PORT = 31337
ROLES = ("bootstrap", "peer", "observer")


def validate_multiaddr(maddr: str, *, require_peer_id: bool, allow_port_zero: bool = True) -> str:
    """Check that ``maddr`` is a TCP multiaddr we can dial or listen on; return it stripped.

    Accepted: ``/ip4/A/tcp/P``, ``/ip6/A/tcp/P``, ``/dns|dns4|dns6/NAME/tcp/P``, optionally followed by
    ``/p2p/<peer id>`` (required when ``require_peer_id``). QUIC and other transports are refused: the
    libp2p streams we rely on lose data over QUIC (measured with hivemind 1.1.12's p2pd).
    """
    text = maddr.strip()
    parts = text.split("/")
    if len(parts) < 5 or parts[0] != "":
        raise ConfigError(f"malformed multiaddr {maddr!r}: expected /ip4/<addr>/tcp/<port>[/p2p/<peer id>]")
    proto, host, transport, port = parts[1:5]
    rest = parts[5:]
    if proto not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        raise ConfigError(f"malformed multiaddr {maddr!r}: unsupported protocol /{proto}")
    try:
        if proto == "ip4":
            ipaddress.IPv4Address(host)
        elif proto == "ip6":
            ipaddress.IPv6Address(host)
        elif not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
            raise ValueError(host)
    except ValueError:
        raise ConfigError(f"malformed multiaddr {maddr!r}: bad {proto} address {host!r}") from None
    if transport != "tcp":
        raise ConfigError(f"malformed multiaddr {maddr!r}: only /tcp is supported (got /{transport})")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"malformed multiaddr {maddr!r}: bad TCP port {port!r}")
    if int(port) == 0 and not allow_port_zero:
        raise ConfigError(f"malformed multiaddr {maddr!r}: port 0 cannot be dialed or announced")
    if rest:
        if len(rest) != 2 or rest[0] != "p2p" or not _BASE58_RE.match(rest[1]):
            raise ConfigError(f"malformed multiaddr {maddr!r}: expected /p2p/<base58 peer id> at the end")
    elif require_peer_id:
        raise ConfigError(f"multiaddr {maddr!r} lacks /p2p/<peer id>: copy the full address a peer prints")
    return text


def validate_swarm_name(name: str) -> str:
    if not SWARM_NAME_RE.match(name):
        raise ConfigError(
            f"bad swarm name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', starting alphanumeric"
        )
    return name


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0 (got {value})")


@dataclass(frozen=True, kw_only=True)
class HostConfig:
    """How this process's libp2p host (a ``p2pd`` daemon) listens, dials and identifies itself."""

    host: str = "0.0.0.0"
    """IP address to listen on for TCP; ``0.0.0.0`` for every IPv4 interface, ``::`` for IPv6."""
    port: int = 0
    """TCP port to listen on; 0 picks a free one."""
    announce: tuple[str, ...] = ()
    """Multiaddrs other peers should dial instead of the listen address (public IP behind NAT)."""
    identity_path: str | None = None
    """libp2p private key file: a stable peer id across restarts. Created (mode 0600) if missing.
    ``None`` uses a fresh key for this run only."""
    initial_peers: tuple[str, ...] = ()
    """Full multiaddrs (``.../p2p/<id>``) of peers already in the swarm; empty for a swarm's first node."""
    client_mode: bool = False
    """Dial out only: serve no DHT requests and never appear as a member (used by ``status``)."""
    upnp: bool = False
    """Ask the home router for a port mapping (UPnP / NAT-PMP). Off by default: it multicasts to the LAN."""
    startup_timeout_s: float = 15.0
    """How long the ``p2pd`` daemon may take to start and connect to the initial peers."""
    data_port: int = 0
    """TCP port of the direct data plane (tensors, on ``host``); 0 picks a free one."""
    netsim: str | None = None
    """For testing: JSON file of per-peer-pair latency / bandwidth to inject into this peer's outgoing streams
    (:mod:`legion_swarm.transport.netsim`). ``None``: the real network only."""

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ConfigError(f"bad --host {self.host!r}: expected an IP address such as 0.0.0.0") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"bad --port {self.port}: expected 0-65535")
        if not 0 <= self.data_port <= 65535:
            raise ConfigError(f"bad --data-port {self.data_port}: expected 0-65535")
        for maddr in self.announce:
            validate_multiaddr(maddr, require_peer_id=False, allow_port_zero=False)
        for maddr in self.initial_peers:
            validate_multiaddr(maddr, require_peer_id=True, allow_port_zero=False)
        _positive("startup_timeout_s", self.startup_timeout_s)

    @property
    def listen_maddr(self) -> str:
        family = "ip6" if ":" in self.host else "ip4"
        return f"/{family}/{self.host}/tcp/{self.port}"


@dataclass(frozen=True, kw_only=True)
class DHTConfig:
    """Kademlia DHT parameters (hivemind's ``DHTNode``)."""

    wait_timeout_s: float = 3.0
    """An RPC to one DHT peer is deemed lost after this many seconds."""
    num_replicas: int = 5
    """Each record is stored on this many nearest peers."""
    bucket_size: int = 20
    """Kademlia k: peers per routing-table bucket."""

    def __post_init__(self) -> None:
        _positive("wait_timeout_s", self.wait_timeout_s)
        if self.num_replicas < 1 or self.bucket_size < self.num_replicas:
            raise ConfigError("need 1 <= num_replicas <= bucket_size")


@dataclass(frozen=True, kw_only=True)
class MembershipConfig:
    """What this peer publishes about itself and how often."""

    swarm: str | None = DEFAULT_SWARM
    """Swarm name; records live under ``legion/<swarm>/...``. ``None``: adopt the entry peer's swarm."""
    role: str = "peer"
    """``bootstrap`` (stable entry point), ``peer`` (trains), ``observer`` (reads, publishes nothing)."""
    heartbeat_s: float = 5.0
    """Seconds between refreshes of this peer's record."""
    ttl_heartbeats: float = 3.0
    """A record expires this many heartbeats after it was written, so a dead peer vanishes in ~3 beats."""

    def __post_init__(self) -> None:
        if self.swarm is not None:
            validate_swarm_name(self.swarm)
        if self.role not in ROLES:
            raise ConfigError(f"bad role {self.role!r}: expected one of {', '.join(ROLES)}")
        _positive("heartbeat_s", self.heartbeat_s)
        if self.ttl_heartbeats < 1.5:
            raise ConfigError("ttl_heartbeats must be >= 1.5, or a live peer's record would flicker")

    @property
    def record_ttl_s(self) -> float:
        return self.heartbeat_s * self.ttl_heartbeats


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """RTT probing (:mod:`legion_swarm.groups.probe`): whom a member pings, how often, how hard.

    A probe round pings at most ``sample`` peers, ``concurrency`` at a time, each ping bounded by
    ``timeout_s``, so it lasts at most ``ceil(sample / concurrency) * timeout_s`` (plus a DHT read and write).
    """

    interval_s: float = 10.0
    """Seconds between probe rounds."""
    sample: int = 8
    """Peers pinged per round (at most 64, an RTT record's capacity): half are the nearest measured so far,
    the rest are picked at random to explore. The cost per peer is O(sample), whatever the swarm's size."""
    repeats: int = 5
    """Timed request/response exchanges per ping, on one stream after an untimed warm-up (at most 32); the median
    of their RTTs is kept."""
    timeout_s: float = 2.0
    """Upper bound on one ping: connecting, opening the stream and every exchange. At most ``interval_s``."""
    first_delay_s: float = 1.0
    """Seconds after joining before the first round, so the first RTTs are known soon after a join."""
    concurrency: int = 4
    """Pings in flight at once: few enough that they do not queue behind each other and inflate the RTTs."""
    ttl_intervals: float = 3.0
    """A measurement, and the record that publishes it, expire this many intervals after they were made."""

    def __post_init__(self) -> None:
        _positive("probe interval_s", self.interval_s)
        _positive("probe timeout_s", self.timeout_s)
        for name, value, top in (("sample", self.sample, 64), ("repeats", self.repeats, 32)):
            if type(value) is not int or not 1 <= value <= top:
                raise ConfigError(f"probe {name} must be an integer in [1, {top}], got {value!r}")
        if type(self.concurrency) is not int or self.concurrency < 1:
            raise ConfigError(f"probe concurrency must be an integer >= 1, got {self.concurrency!r}")
        if not self.first_delay_s >= 0:
            raise ConfigError(f"probe first_delay_s must be >= 0 (got {self.first_delay_s})")
        if self.timeout_s > self.interval_s:
            raise ConfigError(f"probe timeout_s ({self.timeout_s}) must not exceed interval_s ({self.interval_s})")
        if not self.ttl_intervals >= 1.5:
            raise ConfigError("probe ttl_intervals must be >= 1.5, or a live peer's RTT record would flicker")

    @property
    def record_ttl_s(self) -> float:
        return self.interval_s * self.ttl_intervals


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """Everything a :class:`~legion_swarm.peer.SwarmPeer` needs."""

    host: HostConfig = field(default_factory=HostConfig)
    """Transport: listen address, identity, initial peers."""
    dht: DHTConfig = field(default_factory=DHTConfig)
    """DHT tuning."""
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    """Swarm name, role and heartbeat."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """RTT probing (members only; observers neither probe nor answer pings)."""
    join_timeout_s: float = 12.0
    """Upper bound on ``SwarmPeer.create``: daemon start, handshake with the entry peer, DHT bootstrap."""
    close_timeout_s: float = 4.0
    """Upper bound on ``aclose``: the departure notice and daemon shutdown (CLI promises exit in 5 s)."""

    @classmethod
    def observer(
        cls, entries: str | tuple[str, ...], swarm: str | None, *, host: str = "127.0.0.1", dht: DHTConfig | None = None
    ) -> PeerConfig:
        """A DHT client that reads the swarm through ``entries`` without appearing in it (status, simulate,
        chaos, tests)."""
        initial = (entries,) if isinstance(entries, str) else entries
        return cls(
            host=HostConfig(host=host, client_mode=True, initial_peers=initial),
            dht=dht if dht is not None else DHTConfig(),
            membership=MembershipConfig(swarm=swarm, role="observer"),
        )

    def __post_init__(self) -> None:
        _positive("join_timeout_s", self.join_timeout_s)
        _positive("close_timeout_s", self.close_timeout_s)
        if self.join_timeout_s <= self.dht.wait_timeout_s:
            raise ConfigError("join_timeout_s must exceed dht.wait_timeout_s, or a join can never finish")
        if self.host.client_mode and self.membership.role != "observer":
            raise ConfigError("a client-mode host can only be an observer")
