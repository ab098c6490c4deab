"""What a swarm's members share about optimisation and collectives: :class:`TrainConfig` (mode, AdamW,
DiLoCo outer step, codec) and :class:`CollectiveConfig` (chunking, data plane, per-phase deadlines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from legion_swarm.config.flags import cli
from legion_swarm.config.peer import _positive
from legion_swarm.errors import ConfigError

CODECS = ("none", "fp16", "bf16", "int8", "int4", "topk", "sparse")
"""Codec names (mirrors :func:`legion_swarm.codecs.available_codecs`, which needs torch; a test keeps them equal)."""
PLANES = ("auto", "direct", "libp2p")


@dataclass(frozen=True, kw_only=True)
class CollectiveConfig:
    """How a group moves tensors in one round: codecs, chunking, data plane and per-phase deadlines.

    A round runs its phases back to back, each with its own deadline measured from the round's start::

        connect | reduce-scatter (+ owner update) | all-gather | commit (two vote exchanges)

    so ``round_timeout_s`` is their sum: no round lasts longer, whatever its members do. Every member of a
    group must use the same codecs and ``chunk_elems`` (checked in the round's hello).
    """

    # Not a flag: the swarm's codec is the train section's ``codec`` (``--compress``); the trainer sets it here.
    codec: str = field(default="none", metadata=cli(None))
    """Codec of the reduce-scatter contributions: none, fp16, bf16, int8, int4, or topk or sparse (both with
    error feedback)."""
    gather_codec: str | None = field(default=None, metadata=cli(choices=CODECS))
    """Codec of the all-gathered results; ``None``: the same as ``codec``, except ``none`` after ``topk`` and
    ``int8`` after ``sparse``. Never ``topk`` or ``sparse``: a result's unselected values would be lost."""
    quant_block: int | None = None
    """Elements per absmax block for int8 / int4 (a multiple of 8); ``None``: the codec's default (256 / 128)."""
    topk_fraction: float = 0.01
    """Fraction of the elements that ``topk`` sends per chunk."""
    sparse_density: float = 0.02
    """Fraction of the elements that ``sparse`` keeps, per block of 4096 (the largest in magnitude)."""
    sparse_bits: int = 2
    """Bits per value ``sparse`` sends (2 or 4): a symmetric grid on each block's largest magnitude."""
    chunk_elems: int = 1 << 20
    """Elements per chunk: encoding, sending, receiving and reducing overlap at this granularity."""
    plane: str = field(default="auto", metadata=cli(choices=PLANES))
    """``direct`` (authenticated, encrypted TCP), ``libp2p`` (p2pd streams; through NAT and relays) or
    ``auto``: direct when the peer publishes an endpoint we can reach, libp2p otherwise."""
    connect_timeout_s: float = 5.0
    """Opening and authenticating the channels to every other member."""
    reduce_timeout_s: float = 60.0
    """Reduce-scatter: every contribution to this peer's shard has arrived, or its sender is left out."""
    gather_timeout_s: float = 60.0
    """All-gather: every owner's result has arrived, or that shard is missing this round."""
    commit_timeout_s: float = 4.0
    """The two vote exchanges that make every survivor commit the same set of shards (half each)."""
    stall_timeout_s: float = 5.0
    """A channel silent this long inside a phase is a stalled peer, excluded without waiting for the phase
    (the first message of a phase may take 2x, a vote 4x: peers finish phases at different times). At least
    ``connect_timeout_s``: a live member may spend that long waiting for a dead one's channel."""

    def __post_init__(self) -> None:
        for name, value in (("codec", self.codec), ("gather_codec", self.gather_codec)):
            if value is not None and value not in CODECS:
                raise ConfigError(f"bad {name} {value!r}: expected one of {', '.join(CODECS)}")
        if self.gather_codec in ("topk", "sparse"):
            raise ConfigError(
                f"gather_codec cannot be {self.gather_codec}: the unselected values of a result would be lost"
            )
        if self.quant_block is not None and (not 8 <= self.quant_block <= 1 << 20 or self.quant_block % 8):
            raise ConfigError(f"quant_block must be a multiple of 8 in [8, 2**20], got {self.quant_block}")
        if not 0 < self.topk_fraction <= 1:
            raise ConfigError(f"topk_fraction must be in (0, 1], got {self.topk_fraction}")
        density = self.sparse_density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"sparse_density must be in (0, 1], got {density!r}")
        if type(self.sparse_bits) is not int or self.sparse_bits not in (2, 4):
            raise ConfigError(f"sparse_bits must be 2 or 4, got {self.sparse_bits!r}")
        if not 1024 <= self.chunk_elems <= 1 << 24:
            raise ConfigError(f"chunk_elems must be in [1024, 2**24], got {self.chunk_elems}")
        if self.plane not in PLANES:
            raise ConfigError(f"bad plane {self.plane!r}: expected one of {', '.join(PLANES)}")
        for name in ("connect_timeout_s", "reduce_timeout_s", "gather_timeout_s", "commit_timeout_s"):
            _positive(name, getattr(self, name))
        _positive("stall_timeout_s", self.stall_timeout_s)
        if self.stall_timeout_s > min(self.reduce_timeout_s, self.gather_timeout_s):
            raise ConfigError("stall_timeout_s must not exceed reduce_timeout_s or gather_timeout_s")
        if self.connect_timeout_s > self.stall_timeout_s:
            # A member may wait that long for a channel (a peer that died while connecting), and the others
            # must not take it for stalled meanwhile.
            raise ConfigError("connect_timeout_s must not exceed stall_timeout_s")

    @property
    def resolved_gather_codec(self) -> str:
        """The all-gather's codec. Results are dense (an update or an average), so a sparsifying codec would drop
        most of them for good: the gather has no error feedback, every member decodes the same bits and keeps
        them. After ``topk`` (exact fp32 values: a swarm that wants exactness) the gather is lossless ``none``.
        After ``sparse`` it is ``int8``: the point of ``sparse`` is bandwidth, and a lossless gather would move
        ~97x the bytes of its reduce-scatter (int8: a quarter of that), while int8's bounded error (absmax / 254
        per block of 256) is far below the 2-bit contributions' own (absmax / 4 per block of 4096) and is what
        ``diloco`` gathers by default anyway. Set ``gather_codec = "none"`` for an exact gather."""
        if self.gather_codec is not None:
            return self.gather_codec
        return {"topk": "none", "sparse": "int8"}.get(self.codec, self.codec)

    @property
    def round_timeout_s(self) -> float:
        """The longest a round can take: the sum of the phase deadlines."""
        return self.connect_timeout_s + self.reduce_timeout_s + self.gather_timeout_s + self.commit_timeout_s

    def codec_options(self, name: str) -> dict[str, float | int]:
        """Keyword arguments of :func:`legion_swarm.codecs.get_codec` for codec ``name``."""
        if name in ("int8", "int4") and self.quant_block is not None:
            return {"block": self.quant_block}
        if name == "topk":
            return {"fraction": self.topk_fraction}
        if name == "sparse":
            return {"density": self.sparse_density, "bits": self.sparse_bits}
        return {}


MODES = ("sync", "diloco")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How the swarm optimises: the mode, the inner AdamW, the DiLoCo outer step, the codec.

    Part of the swarm's signed config: every member must use the same values (the owners of shards apply
    them for everyone).
    """

    mode: str = field(default="diloco", metadata=cli("mode", choices=MODES))
    """``sync``: average gradients and step every batch. ``diloco``: ``inner_steps`` local steps, then average
    the pseudo-gradients and take a Nesterov outer step."""
    lr: float = field(default=1e-3, metadata=cli("lr"))
    """AdamW learning rate (the inner optimiser in ``diloco``, the sharded one in ``sync``)."""
    # Not a flag: a pair of numbers (set it in the config file's [train] table).
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=cli(None))
    """AdamW's decay rates of the first and second moment estimates."""
    eps: float = 1e-8
    """AdamW's term added to the denominator for numerical stability."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to every parameter."""
    grad_clip: float | None = 1.0
    """Clip each local step's gradient norm to this (``diloco`` inner steps only: in ``sync`` no member sees
    the whole averaged gradient). ``None``: no clipping."""
    inner_steps: int = field(default=20, metadata=cli("inner-steps", metavar="H"))
    """``diloco``: local steps between outer steps (H)."""
    outer_lr: float = 0.7
    """``diloco``: learning rate of the Nesterov outer step on the averaged pseudo-gradient."""
    outer_momentum: float = 0.9
    """``diloco``: Nesterov momentum of the outer step."""
    codec: str | None = field(default=None, metadata=cli("compress", choices=CODECS))
    """Codec of the exchanged tensors; ``None``: ``none`` for ``sync``, ``int8`` for ``diloco``."""
    max_failed_rounds: int = 5
    """Consecutive rounds that commit nothing before training stops with an error."""
    max_group: int = field(default=0, metadata=cli("max-group", metavar="N"))
    """Largest group of one round. A round with more members splits them into latency-based groups of
    ``min_group``..``max_group`` peers that average across groups hierarchically. 0: one group of everyone."""
    min_group: int = field(default=2, metadata=cli("min-group", metavar="N"))
    """Smallest group when the members are split (see ``max_group``)."""
    round_seconds: float | None = field(default=None, metadata=cli(metavar="SECONDS"))
    """A round by time: every member does as many local steps as fit in this many seconds (at most
    ``inner_steps``; in ``sync``, batches whose gradients it accumulates) and contributes with a weight equal to
    its samples, so peers of any speed arrive together and none waits for the slowest. ``None``: by steps."""
    max_staleness: int = 8
    """A member that arrives late keeps its local work and contributes it to its next round if the swarm has
    moved at most this many rounds past the state that work started from; older work is dropped (counted as
    thrown away). 0: always drop late work."""
    round_samples: int | None = field(default=None, metadata=cli(metavar="N"))
    """A round by samples (hivemind's ``target_batch_size``): the whole swarm's local work per round. Each
    member works for ``round_samples`` / the swarm's measured samples/s (the sum of its members' compute rates),
    at most ``round_seconds`` if that is set too and at most ``inner_steps`` steps. ``None``: by steps."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"bad mode {self.mode!r}: expected one of {', '.join(MODES)}")
        for name in ("lr", "outer_lr"):
            _positive(name, getattr(self, name))
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        _positive("eps", self.eps)
        if not 0 <= self.weight_decay < 1 / self.lr:
            raise ConfigError(f"weight_decay must be in [0, 1/lr), got {self.weight_decay}")
        if self.grad_clip is not None:
            _positive("grad_clip", self.grad_clip)
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if not (isinstance(self.inner_steps, int) and self.inner_steps >= 1):
            raise ConfigError(f"inner_steps must be an integer >= 1, got {self.inner_steps}")
        if self.codec is not None and self.codec not in CODECS:
            raise ConfigError(f"bad codec {self.codec!r}: expected one of {', '.join(CODECS)}")
        if not (isinstance(self.max_failed_rounds, int) and self.max_failed_rounds >= 1):
            raise ConfigError(f"max_failed_rounds must be an integer >= 1, got {self.max_failed_rounds}")
        if not (type(self.min_group) is int and type(self.max_group) is int and self.min_group >= 1):
            raise ConfigError(f"min_group and max_group must be integers, min_group >= 1, got {self.min_group}")
        if self.round_seconds is not None:
            _positive("round_seconds", self.round_seconds)
        if not (type(self.max_staleness) is int and self.max_staleness >= 0):
            raise ConfigError(f"max_staleness must be an integer >= 0, got {self.max_staleness}")
        if self.round_samples is not None and not (type(self.round_samples) is int and self.round_samples >= 1):
            raise ConfigError(f"round_samples must be an integer >= 1, got {self.round_samples}")
        if self.max_group and not self.min_group <= self.max_group:
            raise ConfigError(
                f"max_group must be 0 (no limit) or >= min_group, got {self.max_group} < {self.min_group}"
            )

    @property
    def budgeted(self) -> bool:
        """Rounds by time or samples (``inner_steps`` is then an upper bound), not by a fixed step count."""
        return self.round_seconds is not None or self.round_samples is not None

    @property
    def resolved_codec(self) -> str:
        if self.codec is not None:
            return self.codec
        return "none" if self.mode == "sync" else "int8"

    def adamw(self) -> dict[str, float | tuple[float, float]]:
        """Keyword arguments of AdamW (``torch.optim.AdamW`` and the sharded one alike)."""
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}
