"""Top-k sparsification (``topk``) and error feedback (:class:`ErrorFeedback`).

``topk`` keeps the ``k = ceil(fraction * n)`` entries of largest ``|x|`` (ties broken arbitrarily
but deterministically) and sends them as sorted unique int32 indices plus their values:

- ``values="fp32"`` (default): kept entries are **exact**; a dropped entry decodes to 0, so
  ``|x - x̂| <= |x| <= `` the k-th largest ``|x|``. Payload ``8 k`` bytes: ratio ``1 / (2 fraction)``.
- ``values="fp16"``: kept entries within ``max(|x| * 2**-11, 2**-25)`` (and must fit fp16's ±65504,
  otherwise :class:`CodecError`); payload ``6 k`` bytes: ratio ``2 / (3 fraction)``.

Alone, top-k loses most of the signal. With :class:`ErrorFeedback` what was not sent is carried in a
residual and added to the next round's input, so the sum of everything decoded tracks the sum of
everything given, up to the (bounded) current residual.

Selection on large tensors avoids a full ``torch.topk``: a deterministic strided sample of ``|x|``
gives a threshold that, with a wide margin, lets through more than ``k`` candidates; the exact top-k
is then taken among those. If the sample was unlucky (fewer than ``k`` candidates) the full
``torch.topk`` runs instead, so the result is always the exact top-k.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping

import torch

from legion_swarm.codecs.base import (
    Codec,
    CodecError,
    Encoded,
    check_finite_range,
    check_input,
    check_output,
    register,
    require,
)
from legion_swarm.errors import ConfigError

logger = logging.getLogger(__name__)

FP16_MAX = float(torch.finfo(torch.float16).max)
FP32_MAX = float(torch.finfo(torch.float32).max)
MAX_TOPK_NUMEL = (1 << 31) - 1
"""Indices are int32 on the wire."""
_SAMPLE = 1 << 16
_SAMPLED_SELECTION_MIN = 1 << 18
"""Below this many elements a plain ``torch.topk`` is as fast as the sampled selection."""


@register
class TopKCodec(Codec):
    """Keep the ``ceil(fraction * n)`` largest-magnitude entries: int32[k] indices, float32 or float16[k] values."""

    name = "topk"

    def __init__(self, fraction: float = 0.01, values: str = "fp32") -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ConfigError(f"topk fraction must be in (0, 1], got {fraction!r}")
        if values not in ("fp32", "fp16"):
            raise ConfigError(f"topk values must be 'fp32' or 'fp16', got {values!r}")
        self.fraction = float(fraction)
        self.values = values

    @property
    def ratio(self) -> float:
        return 4 / (self.fraction * (8 if self.values == "fp32" else 6))

    def k_for(self, n: int) -> int:
        """Entries kept out of ``n``: ``ceil(fraction * n)``, at least 1 when ``n > 0``."""
        return min(n, max(1 if n else 0, math.ceil(self.fraction * n)))

    @classmethod
    def from_params(cls, params: Mapping[str, int]) -> Codec:
        if set(params) != {"k", "vbits"}:
            raise ConfigError(f"topk takes exactly the parameters 'k' and 'vbits', got {sorted(params)}")
        if params["k"] < 0 or params["vbits"] not in (16, 32):
            raise ConfigError(f"topk needs k >= 0 and vbits in (16, 32), got {dict(params)}")
        # fraction only matters to encode; a decoder reads k from the message.
        return cls(values="fp32" if params["vbits"] == 32 else "fp16")

    @classmethod
    def layout(cls, numel: int, params: Mapping[str, int]) -> list[tuple[str, int]]:
        k = params["k"]
        if k > numel:  # a receiver sizes its buffers from k: it must never exceed the chunk
            raise ConfigError(f"topk keeps at most numel = {numel} entries, message says k = {k}")
        return [("int32", k), ("float32" if params["vbits"] == 32 else "float16", k)]

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Sorted int64 indices of the ``k_for(len(x))`` largest ``|x|`` (``x`` 1-D float32, finite)."""
        n = x.numel()
        k = self.k_for(n)
        if k == n:
            return torch.arange(n, device=x.device)
        magnitude = x.abs()
        chosen = None
        if n >= _SAMPLED_SELECTION_MIN and k * 4 <= n:
            chosen = _sampled_topk(magnitude, k)
        if chosen is None:
            chosen = torch.topk(magnitude, k, sorted=False).indices
        return chosen.sort().values

    def encode(self, x: torch.Tensor) -> Encoded:
        x = check_input(x)
        n = x.numel()
        if n > MAX_TOPK_NUMEL:
            raise CodecError(f"topk indices are int32: at most {MAX_TOPK_NUMEL} elements, got {n}")
        check_finite_range(x, FP32_MAX, "topk")
        idx = self.select(x)
        kept = x.index_select(0, idx)
        if self.values == "fp16":
            check_finite_range(kept, FP16_MAX, "topk fp16 values")
            kept = kept.to(torch.float16)
        vbits = 32 if self.values == "fp32" else 16
        return Encoded(
            codec=self.name, numel=n, params={"k": idx.numel(), "vbits": vbits}, buffers=(idx.to(torch.int32), kept)
        )

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        idx, kept = enc.buffers
        out = check_output(out, enc.numel, kept.device).zero_()
        out.index_copy_(0, idx.long(), kept.to(torch.float32))
        return out

    def subtract_decoded_(self, y: torch.Tensor, enc: Encoded, scratch: torch.Tensor | None = None) -> None:
        idx, kept = enc.buffers
        # Only k entries change: no dense decode (fp32 values leave exact zeros there).
        y.index_add_(0, idx.long(), kept.to(torch.float32), alpha=-1)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x)
        bound = x.abs()
        idx = self.select(x)
        if self.values == "fp32":
            bound.index_fill_(0, idx, 0.0)
        else:
            bound.index_copy_(0, idx, (bound.index_select(0, idx) * 2.0**-11).clamp_min_(2.0**-25))
        return bound

    @classmethod
    def check(cls, enc: Encoded) -> None:
        idx, kept = enc.buffers
        if idx.numel():
            require(int(idx[0]) >= 0 and int(idx[-1]) < enc.numel, f"topk indices must be in [0, {enc.numel})")
            require(bool((idx[1:] > idx[:-1]).all()), "topk indices must be strictly increasing")
            lo, hi = torch.aminmax(kept)
            require(bool(torch.isfinite(lo) & torch.isfinite(hi)), "topk values must be finite")


def _sampled_topk(magnitude: torch.Tensor, k: int) -> torch.Tensor | None:
    """Exact top-k indices via a sampled threshold, or None when the sample under-shoots.

    Every element at or above the threshold is a candidate; if there are at least ``k`` of them, the
    k largest of the whole tensor are all among them, so topk over the candidates is exact.
    """
    n = magnitude.numel()
    # An evenly strided sample: sequential reads the prefetcher follows (a random gather costs a cache miss
    # per element). Periodic data could bias it; that only costs speed (more candidates, or the fallback).
    stride = n // _SAMPLE
    sample = magnitude[stride // 2 :: stride][:_SAMPLE].contiguous()
    size = sample.numel()
    expected = k * size / n
    # Aim at ~1.3 k candidates plus 5 standard deviations of the sample count: misses are very rare.
    rank = min(size, math.ceil(1.3 * expected + 5 * math.sqrt(expected) + 8))
    threshold = torch.kthvalue(sample, size - rank + 1).values
    candidates = torch.nonzero(magnitude >= threshold).squeeze(1)
    if candidates.numel() < k:
        logger.debug("sampled top-k threshold found %d < %d candidates; full topk", candidates.numel(), k)
        return None
    best = torch.topk(magnitude.index_select(0, candidates), k, sorted=False).indices
    return candidates.index_select(0, best)


_SPARE_PER_LENGTH = 2  # free buffers error feedback keeps per chunk length


class ErrorFeedback:
    """Residual memory that makes a lossy codec unbiased over rounds.

    For each key (e.g. ``(shard, peer)``: one residual per destination of each shard) it keeps the
    part of past inputs that was not sent: ``encode(x, key)`` compresses ``y = x + residual`` and keeps
    ``y - decode(encoded)`` as the new residual. Hence, for every key, after any number of rounds::

        sum(inputs) == sum(decoded) + residual      (up to float32 rounding of the additions)

    A lossless codec keeps no residual. A residual whose length no longer matches the key's input
    (the group re-partitioned) is a caller bug and raises ValueError; call :meth:`reset` first.
    Residuals are float32, one tensor of the input's size per key.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._residuals: dict[Hashable, torch.Tensor] = {}
        # Float32 buffers free for reuse (replaced residuals, decode scratch), by length: an encode allocates
        # nothing in steady state (two fresh chunks per encode were page faults at every round).
        self._spare: dict[int, list[torch.Tensor]] = {}

    def encode(self, x: torch.Tensor, key: Hashable) -> Encoded:
        """Compress ``x + residual[key]``; on error (e.g. non-finite input) the residual is left unchanged.

        The new residual replaces the old one, whose memory is reused later: do not keep a reference to a
        residual across an ``encode`` of its key."""
        x = check_input(x)
        if self.codec.lossless:
            return self.codec.encode(x)
        residual = self._residuals.get(key)
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"residual for {key!r} has {residual.numel()} elements, input {x.numel()}; reset it")
        y = self._take(x.numel())
        if residual is None:
            y.copy_(x)
        else:
            torch.add(residual, x, out=y)
        try:
            enc = self.codec.encode(y)
        except BaseException:
            self._give(y)
            raise
        scratch = self._take(x.numel())
        self.codec.subtract_decoded_(y, enc, scratch)  # lossy codecs never alias their input: y is ours to reuse
        self._give(scratch)
        self._residuals[key] = y
        if residual is not None:
            self._give(residual)
        return enc

    def _take(self, numel: int) -> torch.Tensor:
        free = self._spare.get(numel)
        return free.pop() if free else torch.empty(numel, dtype=torch.float32)

    def _give(self, buffer: torch.Tensor) -> None:
        free = self._spare.setdefault(buffer.numel(), [])
        if len(free) < _SPARE_PER_LENGTH:
            free.append(buffer)

    def residual(self, key: Hashable) -> torch.Tensor | None:
        """The current residual for ``key`` (not a copy), or None."""
        return self._residuals.get(key)

    def reset(self, key: Hashable | None = None) -> None:
        """Forget the residual of ``key``, or of every key."""
        if key is None:
            self._residuals.clear()
            self._spare.clear()  # the lengths change with the partition
        else:
            self._residuals.pop(key, None)

    def keys(self) -> list[Hashable]:
        """The keys that hold a residual."""
        return list(self._residuals)

    def __len__(self) -> int:
        return len(self._residuals)


__all__ = ["ErrorFeedback", "TopKCodec"]
