"""The swarm's config: model, data and optimiser settings every member must share, signed by its creator.

The creator (``legion-swarm bootstrap --config swarm.toml``) signs the canonical msgpack of the config with
its identity key and stores it in the DHT under ``legion/<swarm>/config``. Every training member stores a
copy of the same signed bytes under its own subkey, so the config outlives the creator. A joiner learns the
config hash from its entry peer's hello, reads the copies, keeps one whose creator signature verifies and
whose hash matches (a joiner whose entry peer spoke no hello, e.g. a plain hivemind DHT node, keeps the copy most
members serve), and refuses to train with a conflicting local setting (:class:`SwarmConfigError`).
One object per peer owns all of that: :class:`SwarmConfigKeeper` fetches the config, names its digest in the
peer's hello and republishes the peer's copy from a task it cancels and awaits on close.

The config has four sections (TOML tables): ``[model]``, ``[data]``, ``[train]`` and ``[collective]``
(chunking, data plane and per-phase deadlines of the rounds). A section left out takes its defaults. The
``[collective]`` section is written only when it differs from the defaults, so a config that leaves it at its
defaults keeps the bytes and the digest it had before the section existed (old DHT records and checkpoints
verify and load as they did); setting any ``[collective]`` value changes the digest, and peers of a version
without the section refuse such a config (an unknown section) instead of running other deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from legion_swarm.config import SPEC_SECTIONS, CollectiveConfig, DataConfig, ModelConfig, TrainConfig, option_of
from legion_swarm.dht.node import SwarmDHT, dht_time
from legion_swarm.dht.records import ConfigRecord, config_key
from legion_swarm.errors import ConfigError, SwarmConfigError
from legion_swarm.transport.identity import Identity, peer_id_of, verify

if TYPE_CHECKING:
    from legion_swarm.peer import SwarmPeer

logger = logging.getLogger(__name__)

SPEC_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class SwarmSpec:
    """Everything that must be equal on every training member of a swarm."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model: preset and sizes."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the tokens come from and how they are sharded and batched."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Mode, optimisers and the codec of the exchanged tensors."""
    collective: CollectiveConfig = field(default_factory=CollectiveConfig)
    """Chunking, data plane and deadlines of the collective rounds. Its ``codec`` stays at the default: the
    swarm's codec is ``train.codec`` (see :meth:`collective_config`)."""

    def __post_init__(self) -> None:
        if self.collective.codec != CollectiveConfig.codec:
            raise ConfigError("the swarm's codec is train.codec; leave collective.codec unset")

    def collective_config(self, local: CollectiveConfig | None = None) -> CollectiveConfig:
        """What a member's collective rounds run with: the ``collective`` section (or ``local``, a trainer's
        own deadlines, e.g. short ones in tests) with the swarm's codecs (``train`` codec, ``collective``
        gather codec)."""
        base = self.collective if local is None else local
        return dataclasses.replace(
            base, codec=self.train.resolved_codec, gather_codec=self.collective.gather_codec
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": SPEC_VERSION}
        for section in SPEC_SECTIONS:
            values = dataclasses.asdict(getattr(self, section))
            out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        del out["collective"]["codec"]
        if self.collective == CollectiveConfig():  # the digest of a config without the section (module doc)
            del out["collective"]
        return out

    @classmethod
    def from_dict(cls, obj: Any) -> SwarmSpec:
        if not isinstance(obj, dict) or obj.get("version", SPEC_VERSION) != SPEC_VERSION:
            raise SwarmConfigError(f"not a swarm config of version {SPEC_VERSION}")
        unknown = set(obj) - {"version", *SPEC_SECTIONS}
        if unknown:
            raise SwarmConfigError(f"unknown swarm config sections: {', '.join(sorted(unknown))}")
        train = dict(obj.get("train", {}))
        collective = dict(obj.get("collective", {}))
        for section, values, names in (
            ("train", train, [f.name for f in dataclasses.fields(TrainConfig)]),
            ("collective", collective, [f.name for f in dataclasses.fields(CollectiveConfig) if f.name != "codec"]),
        ):
            if set(values) - set(names):
                raise SwarmConfigError(f"unknown [{section}] keys: {', '.join(sorted(set(values) - set(names)))}")
        if "betas" in train:  # TOML and msgpack have no tuples
            train["betas"] = tuple(train["betas"])
        try:
            sections = {
                "model": ModelConfig.from_dict(obj.get("model", {})), "data": DataConfig.from_dict(obj.get("data", {})),
                "train": TrainConfig(**train), "collective": CollectiveConfig(**collective),
            }  # fmt: skip
            return cls(**sections)
        except (TypeError, ConfigError) as e:
            raise SwarmConfigError(f"bad swarm config: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> SwarmSpec:
        """Read a TOML file with optional ``[model]``, ``[data]``, ``[train]`` and ``[collective]`` tables."""
        try:
            with open(path, "rb") as f:
                return cls.from_dict(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SwarmConfigError(f"cannot read swarm config {path}: {e}") from None

    def canonical(self) -> bytes:
        """Deterministic bytes of the config (map keys sorted at every level): what is hashed and signed."""
        return msgpack.packb(_sorted(self.to_dict()))

    def digest(self) -> bytes:
        return hashlib.sha256(self.canonical()).digest()


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_sorted(v) for v in obj]
    return obj


@dataclass(frozen=True)
class SignedSpec:
    """A spec with its creator's signature over :meth:`SwarmSpec.canonical`."""

    spec: SwarmSpec
    creator: str
    creator_key: bytes
    signature: bytes

    @classmethod
    def sign(cls, spec: SwarmSpec, identity: Identity) -> SignedSpec:
        return cls(spec, identity.peer_id, identity.public_key, identity.sign(spec.canonical()))

    @property
    def digest(self) -> bytes:
        return self.spec.digest()

    def record(self, swarm: str, writer: str) -> ConfigRecord:
        return ConfigRecord(
            swarm=swarm, peer_id=writer, sent_at=dht_time(), creator=self.creator, creator_key=self.creator_key,
            config=self.spec.canonical(), signature=self.signature,
        )  # fmt: skip

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SignedSpec:
        """Check the creator's signature and parse; :class:`SwarmConfigError` if anything is off."""
        if peer_id_of(record.creator_key) != record.creator:
            raise SwarmConfigError("config record: the creator key does not match the creator id")
        if not verify(record.creator_key, record.config, record.signature):
            raise SwarmConfigError("config record: bad creator signature")
        try:
            spec = SwarmSpec.from_dict(msgpack.unpackb(record.config))
        except (ValueError, msgpack.UnpackException) as e:
            raise SwarmConfigError(f"config record: undecodable config: {e}") from None
        if spec.canonical() != record.config:
            raise SwarmConfigError("config record: the config is not in canonical form")
        return cls(spec, record.creator, record.creator_key, record.signature)


async def publish_spec(dht: SwarmDHT, swarm: str, signed: SignedSpec, ttl_s: float) -> bool:
    """Store (or refresh) our copy of the signed config."""
    record = signed.record(swarm, dht.host.peer_id)
    return await dht.store_own(config_key(swarm), record.to_wire(), dht_time() + ttl_s)


async def fetch_spec(dht: SwarmDHT, swarm: str, digest: bytes | None = None) -> SignedSpec | None:
    """The swarm's signed config from any member's copy: the one with ``digest`` if given, else the copy most
    members serve. ``None`` if there is none (yet)."""
    found = await dht.read_all(config_key(swarm), ConfigRecord)
    valid: list[SignedSpec] = []
    for owner, f in found.items():
        assert isinstance(f.record, ConfigRecord)
        try:
            valid.append(SignedSpec.from_record(f.record))
        except SwarmConfigError as e:
            logger.warning("ignoring the config copy of %s: %s", owner[:16], e)
    if digest is not None:
        valid = [s for s in valid if s.digest == digest]
    if not valid:
        return None
    counts: dict[bytes, int] = {}
    for s in valid:
        counts[s.digest] = counts.get(s.digest, 0) + 1
    best = max(counts, key=lambda d: (counts[d], d))
    return next(s for s in valid if s.digest == best)


def check_overrides(spec: SwarmSpec, overrides: dict[str, dict[str, Any]]) -> None:
    """Refuse local settings that differ from the swarm's: ``{"train": {"mode": "sync"}, ...}``."""
    for section, values in overrides.items():
        config = getattr(spec, section)
        for key, value in values.items():
            have = getattr(config, key)
            if isinstance(have, tuple):
                value = tuple(value)
            if have != value:
                flag = option_of(SPEC_SECTIONS[section], section, key)
                raise SwarmConfigError(
                    f"{flag} {value} conflicts with the swarm's config ({section}.{key} = {have}); "
                    "drop the option to use the swarm's value"
                )


class SwarmConfigKeeper:
    """The one owner of a peer's signed swarm config: it fetches the config (the one the entry peers named),
    holds it, names its digest in the peer's hello answers and keeps the peer's copy in the DHT from a task of
    its own, which :meth:`aclose` (or leaving ``async with``) cancels and awaits.

    ::

        async with SwarmConfigKeeper(peer) as keeper:
            keeper.hold(await keeper.fetch())   # a joiner; a creator holds what it signed
            ...                                  # train
    """

    def __init__(self, peer: SwarmPeer, *, every_s: float = 5.0) -> None:
        self.peer = peer
        self.every_s = every_s
        """Seconds between republications; the copy lives three of them, so it outlives two missed ones."""
        self.signed: SignedSpec | None = None
        self._publisher: asyncio.Task[None] | None = None

    async def fetch(self, timeout: float = 20.0) -> SignedSpec:
        """The swarm's signed config: the one whose digest the entry peers named in their hello (any copy in
        the DHT with that digest and a valid creator signature), or, if they named none, the copy most members
        serve. :class:`SwarmConfigError` if the entry peers disagree or nothing is readable in ``timeout`` s."""
        peer = self.peer
        named = {h.config for h in peer.entry_hellos if h.config is not None}
        if len(named) > 1:
            raise SwarmConfigError("the entry peers name different training configs for this swarm")
        digest = named.pop() if named else None
        assert peer.dht is not None
        deadline = time.monotonic() + timeout
        while True:
            signed = await fetch_spec(peer.dht, peer.swarm, digest)
            if signed is not None:
                return signed
            if time.monotonic() > deadline:
                raise SwarmConfigError(
                    f"swarm {peer.swarm!r} publishes no training config (start its bootstrap with --config or "
                    f"training flags), or it was not readable within {timeout:.0f} s"
                )
            await asyncio.sleep(0.5)

    def hold(self, signed: SignedSpec) -> None:
        """Serve ``signed`` from now on: joiners through this peer are told its digest and find its copy."""
        if self._publisher is not None:
            raise RuntimeError("the keeper already holds a config")
        self.signed = signed
        self.peer.set_hello_field("config", signed.digest)
        self._publisher = asyncio.create_task(self._publish_forever(signed))

    async def _publish_forever(self, signed: SignedSpec) -> None:
        assert self.peer.dht is not None
        while True:
            try:
                await publish_spec(self.peer.dht, self.peer.swarm, signed, ttl_s=3 * self.every_s)
            except Exception as e:  # refreshed next time; the copy outlives two misses
                logger.warning("[%s] could not store the swarm config: %r", self.peer.tag, e)
            await asyncio.sleep(self.every_s)

    async def aclose(self) -> None:
        """Stop republishing (the copy in the DHT expires on its own) and wait until the task has ended."""
        task, self._publisher = self._publisher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> SwarmConfigKeeper:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
