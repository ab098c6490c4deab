"""Element-wise float codecs: ``none`` (raw float32), ``fp16`` and ``bf16``.

Declared bounds, per element, for finite input ``x`` (round-to-nearest-even conversions):

=======  ======  =====================================================  ===========================
codec    ratio   ``|x - x̂|`` at most                                     accepted input
=======  ======  =====================================================  ===========================
none     1       0                                                      finite
fp16     2       ``max(|x| * 2**-11, 2**-25)``                          finite, ``|x| <= 65504``
bf16     2       ``max(|x| * 2**-8, 2**-134)``                          finite, ``|x| <= 3.3895e38``
=======  ======  =====================================================  ===========================

The absolute floors are half the spacing of each format's subnormals (``2**-24`` for fp16,
``2**-133`` for bf16), where the relative bound no longer holds.

Overflow: values beyond the format's largest finite value are **rejected** with
:class:`~legion_swarm.codecs.base.CodecError`, not clamped. Clamping would silently break the bound
by an unbounded amount; a gradient that large is a training problem the caller must see (or it
should pick ``bf16`` / ``int8``, which cover the whole float32 range).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from legion_swarm.codecs.base import (
    Codec,
    CodecError,
    Encoded,
    all_finite,
    all_finite_16bit,
    check_finite_range,
    check_input,
    check_output,
    register,
    require,
)
from legion_swarm.errors import ConfigError

FP32_MAX = float(torch.finfo(torch.float32).max)


class _CastCodec(Codec):
    """Shared body: one buffer of ``numel`` elements of ``wire_dtype``."""

    wire_dtype: ClassVar[torch.dtype]
    wire_dtype_name: ClassVar[str]
    limit: ClassVar[float]
    rel: ClassVar[float]
    floor: ClassVar[float]

    @property
    def ratio(self) -> float:
        return 32 / torch.finfo(self.wire_dtype).bits

    @classmethod
    def from_params(cls, params: Mapping[str, int]) -> Codec:
        if params:
            raise ConfigError(f"{cls.name} takes no parameters, got {sorted(params)}")
        return cls()

    @classmethod
    def layout(cls, numel: int, params: Mapping[str, int]) -> list[tuple[str, int]]:
        return [(cls.wire_dtype_name, numel)]

    def encode(self, x: torch.Tensor) -> Encoded:
        x = check_input(x)
        check_finite_range(x, self.limit, self.name)
        payload = x if self.wire_dtype == torch.float32 else x.to(self.wire_dtype)
        return Encoded(codec=self.name, numel=x.numel(), params={}, buffers=(payload,))

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        (payload,) = enc.buffers
        if out is None and payload.dtype == torch.float32:
            return payload
        return check_output(out, enc.numel, payload.device).copy_(payload)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x)
        return (x.abs() * self.rel).clamp_min_(self.floor)

    @classmethod
    def check(cls, enc: Encoded) -> None:
        (payload,) = enc.buffers
        if payload.numel():
            # Infinity and NaN are the only values that decode to something non-finite.
            if payload.dtype == torch.float32:
                finite = all_finite(payload)
            else:
                finite = all_finite_16bit(payload)
            require(finite, f"{cls.name} payload contains NaN or infinity")


@register
class NoneCodec(_CastCodec):
    """Raw float32: lossless, ratio 1. ``encode`` and ``decode`` return views, not copies."""

    name = "none"
    lossless = True
    wire_dtype = torch.float32
    wire_dtype_name = "float32"
    limit = FP32_MAX
    rel = 0.0
    floor = 0.0


@register
class FP16Codec(_CastCodec):
    """IEEE half precision, round-to-nearest-even: ``|x - x̂| <= max(|x| * 2**-11, 2**-25)``; ``|x| <= 65504``."""

    name = "fp16"
    wire_dtype = torch.float16
    wire_dtype_name = "float16"
    limit = float(torch.finfo(torch.float16).max)
    rel = 2.0**-11
    floor = 2.0**-25


@register
class BF16Codec(_CastCodec):
    """bfloat16, round-to-nearest-even: ``|x - x̂| <= max(|x| * 2**-8, 2**-134)``; ``|x| <= 3.3895e38``."""

    name = "bf16"
    wire_dtype = torch.bfloat16
    wire_dtype_name = "bfloat16"
    limit = float(torch.finfo(torch.bfloat16).max)
    rel = 2.0**-8
    floor = 2.0**-134


__all__ = ["BF16Codec", "CodecError", "FP16Codec", "NoneCodec"]
