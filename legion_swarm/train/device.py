"""Where a peer computes: the device (CPU, a CUDA GPU, Apple's MPS) and the precision of its passes.

Volunteers bring what they have, and one swarm mixes them: a GPU peer, a laptop, a bf16 card beside an fp32
one. What the swarm shares never depends on it. The model, its batches and the inner optimizer live on the
peer's device; forward and backward run under autocast in the chosen precision with float32 master weights;
everything a round exchanges (contributions, the owners' arithmetic, the state every member holds
bit-identically, the sharded outer optimizer state) is float32 on the host. So peers on different devices or
precisions contribute different numbers, but once a round commits they hold the same bits.

- :func:`resolve_device` turns ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device`` or says what is available.
- :class:`Placement` is a peer's device and precision: autocast, moving batches, and host staging buffers for
  what leaves the device (pinned memory on CUDA, so the copies can run asynchronously).
- :class:`LossScaler` is the dynamic loss scaling fp16 needs (its gradients underflow without it).

Nothing here special-cases the CPU: a CPU peer runs the same path (autocast included, for bf16 and fp16), so
the CPU tests exercise what a GPU peer runs.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from legion_swarm.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
"""Precisions of forward and backward passes; the master weights are float32 in all of them."""

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")


def available_devices() -> list[str]:
    """The devices this machine can train on, e.g. ``["cpu", "cuda:0"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_device_name(text: str) -> str:
    """``text`` if it names a device this machine has (or ``auto``); else a :class:`ConfigError` naming what it
    has. The CLI checks flags with it before any process starts."""
    resolve_device(text)
    return text


def resolve_device(text: str) -> torch.device:
    """``auto`` (CUDA if present, then MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    name = text.strip().lower()
    if not _DEVICE_RE.match(name):
        raise ConfigError(f"bad device {text!r}: expected auto, cpu, cuda, cuda:N or mps")
    have = available_devices()
    if name == "auto":
        return torch.device(next((d for d in have if d != "cpu"), "cpu"))
    wanted = "cuda:0" if name == "cuda" else name
    if wanted not in have:
        why = " (MPS needs macOS on Apple silicon)" if name == "mps" else ""
        raise ConfigError(f"device {name} is not available{why}; this machine has: {', '.join(have)}")
    return torch.device(wanted)


def check_precision(text: str) -> str:
    if text not in PRECISIONS:
        raise ConfigError(f"bad precision {text!r}: expected one of {', '.join(PRECISIONS)}")
    return text


@dataclass(frozen=True)
class Placement:
    """A peer's device and the precision of its forward and backward passes."""

    device: torch.device
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{self.device} does not support bf16; use fp16 or fp32")

    @classmethod
    def of(cls, device: str | torch.device = "cpu", precision: str = "fp32") -> Placement:
        return cls(device if isinstance(device, torch.device) else resolve_device(device), precision)

    @property
    def label(self) -> str:
        """``cuda:0/bf16``, as ``status`` shows it."""
        return f"{self.device}/{self.precision}"

    @property
    def scales_loss(self) -> bool:
        """fp16 gradients underflow without a loss scale; bf16 has float32's range and needs none."""
        return self.precision == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The context of a forward pass: autocast to the precision (nothing for fp32)."""
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of token ids on the device (asynchronously from pinned memory where there is some)."""
        return batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)

    def host_buffers(self, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Float32 host tensors shaped like ``like``, pinned where the device copies from pinned memory
        asynchronously (CUDA)."""
        pin = self.device.type == "cuda"
        return [torch.empty(t.shape, dtype=torch.float32, pin_memory=pin) for t in like]

    def to_host(self, tensors: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Copy ``tensors`` (on the device) into the host buffers ``out``: all copies are queued, then one wait."""
        for o, t in zip(out, tensors, strict=True):
            o.copy_(t.detach(), non_blocking=True)
        self.synchronize()
        return list(out)

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op where work is synchronous)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()


class LossScaler:
    """Dynamic loss scaling for fp16: multiply the loss by ``scale`` before backward, divide the gradients by it
    after; a step whose gradients overflowed is skipped and halves the scale, ``growth_interval`` good steps in
    a row double it."""

    def __init__(self, scale: float = 2.0**16, *, growth_interval: int = 1000, min_scale: float = 1.0) -> None:
        self.scale = scale
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self._good = 0
        self.skipped = 0
        """Steps skipped because their gradients overflowed."""

    def unscale_(self, params: Sequence[torch.Tensor]) -> bool:
        """Divide the gradients by the scale in place; True if they are all finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        torch._foreach_mul_(grads, 1.0 / self.scale)
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        return bool(torch.isfinite(norms).all())

    def update(self, finite: bool) -> None:
        if finite:
            self._good += 1
            if self._good >= self.growth_interval and math.isfinite(self.scale * 2):
                self.scale *= 2
                self._good = 0
        else:
            self.skipped += 1
            self.scale = max(self.scale / 2, self.min_scale)
            self._good = 0


def forward_backward(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], placement: Placement | None = None,
    scaler: LossScaler | None = None,
) -> float:  # fmt: skip
    """One forward (under the placement's autocast; None: float32, the batch where it is) and backward pass;
    gradients accumulate into ``.grad``, multiplied by ``scaler.scale`` if a scaler is given. Returns the
    (unscaled) loss."""
    inputs, targets = batch if placement is None else placement.batch(batch)
    with contextlib.nullcontext() if placement is None else placement.autocast():
        _, loss = model(inputs, targets)
    (loss * scaler.scale if scaler is not None else loss).backward()
    return float(loss.detach())
