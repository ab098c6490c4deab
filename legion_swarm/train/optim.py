"""Sharded optimizers: the state of one contiguous range of the flat parameter space, held by its owner only.

In a group of G members each owner keeps optimizer state for its shard alone (ZeRO-1/2), so a member holds
about 1/G of the state a single-process optimizer would. An owner turns its averaged shard into an
*update* ``u`` (the new parameters are ``p - u``) inside the collectives' ``update_fn``; the update, not the
parameters, is all-gathered, because a lossy codec then errs on a small difference instead of on the
weights themselves. State changes are staged and applied only once the round commits this owner's shard,
so a round that loses the shard leaves the state as it was.

Two rules, same machinery:

- :class:`ShardedAdamW` (``sync`` mode, on averaged gradients): torch's AdamW, elementwise.
- :class:`ShardedNesterov` (``diloco`` outer step, on averaged pseudo-gradients): SGD with Nesterov
  momentum as ``torch.optim.SGD(momentum=mu, nesterov=True)`` computes it.

When the partition changes (a member joins or leaves), :meth:`ShardState.rebase` moves the state to the new
range: the overlap with the old range is kept, the rest is filled from slices the previous owners hand
over or starts fresh, with AdamW's bias correction restarting for just those elements.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

Segment = tuple[int, int, int]
"""``(start, end, step)``: elements ``[start, end)`` of the flat space have taken ``step`` optimizer steps."""


@dataclass
class StateSlice:
    """Optimizer state for flat elements ``[start, end)``: named 1-D float32 buffers and step segments."""

    start: int
    end: int
    buffers: dict[str, torch.Tensor]
    segments: list[Segment]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def sub(self, start: int, end: int) -> StateSlice | None:
        """The part covering ``[start, end)``, or None if this slice does not hold all of it."""
        if not (self.start <= start <= end <= self.end):
            return None
        buffers = {n: b[start - self.start : end - self.start] for n, b in self.buffers.items()}
        return StateSlice(start, end, buffers, _clip(self.segments, start, end))


@dataclass(frozen=True)
class Staged:
    """New state computed for one round, applied by :meth:`ShardState.commit` if the round commits."""

    buffers: dict[str, torch.Tensor]
    segments: list[Segment]


class ShardState:
    """Per-element optimizer buffers for one flat range, plus how many steps each element has taken."""

    buffer_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.start = self.end = 0
        self.buffers: dict[str, torch.Tensor] = {name: torch.zeros(0) for name in self.buffer_names}
        self.segments: list[Segment] = []

    @property
    def numel(self) -> int:
        return self.end - self.start

    def nbytes(self) -> int:
        """Bytes of optimizer state held (what ZeRO divides by the group size)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def rebase(self, start: int, end: int, handed: Sequence[StateSlice] = ()) -> int:
        """Hold the state of ``[start, end)`` from now on: keep the overlap with the old range, take the rest
        from ``handed`` (slices the previous owners handed over) where they cover it, and start the remaining
        elements fresh. Returns how many elements start fresh."""
        if (start, end) == (self.start, self.end):
            return 0
        new = {name: torch.zeros(end - start) for name in self.buffer_names}
        segments: list[Segment] = []
        covered: list[tuple[int, int]] = []
        mine = StateSlice(self.start, self.end, self.buffers, self.segments)
        for source in (mine, *handed):
            for lo, hi in _gaps(start, end, covered):
                lo, hi = max(lo, source.start), min(hi, source.end)
                if lo >= hi or set(source.buffers) != set(self.buffer_names):
                    continue
                for name in self.buffer_names:
                    new[name][lo - start : hi - start] = source.buffers[name][lo - source.start : hi - source.start]
                segments += _clip(source.segments, lo, hi)
                covered.append((lo, hi))
        fresh = 0
        for lo, hi in _gaps(start, end, covered):
            segments.append((lo, hi, 0))
            fresh += hi - lo
        self.start, self.end, self.buffers = start, end, new
        self.segments = _merge(sorted(segments))
        if fresh:
            logger.info("optimizer state for %d of %d elements starts fresh", fresh, end - start)
        return fresh

    def export(self, start: int, end: int) -> StateSlice | None:
        """A copy of the state of ``[start, end)`` if this holds all of it (for the next owner)."""
        part = StateSlice(self.start, self.end, self.buffers, self.segments).sub(start, end)
        if part is None:
            return None
        return StateSlice(start, end, {n: b.clone() for n, b in part.buffers.items()}, part.segments)

    def commit(self, staged: Staged) -> None:
        """Apply what :meth:`compute` staged (only once the round committed this shard)."""
        self.buffers, self.segments = staged.buffers, staged.segments

    def _per_element(self, segments: list[Segment], fn: Callable[[int], float]) -> torch.Tensor | float:
        """``fn(step)`` for each element of ``segments``: a float when all share a step, else a 1-D tensor."""
        if len(segments) <= 1:
            return fn(segments[0][2] if segments else 0)
        out = torch.empty(self.numel)
        for lo, hi, step in segments:
            out[lo - self.start : hi - self.start] = fn(step)
        return out


class ShardedAdamW(ShardState):
    """AdamW (decoupled weight decay, bias-corrected) for one shard; matches ``torch.optim.AdamW`` elementwise."""

    buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01
    ) -> None:
        super().__init__()
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    def compute(self, params: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Staged]:
        """The update ``u`` (new params are ``params - u``) and the staged state, for this shard's
        ``params`` and averaged ``grad`` (1-D float32, this shard's size). Nothing is modified."""
        self._check(params, grad)
        beta1, beta2 = self.betas
        segments = [(lo, hi, step + 1) for lo, hi, step in self.segments]
        exp_avg = self.buffers["exp_avg"].lerp(grad, 1 - beta1)
        exp_avg_sq = self.buffers["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        staged = Staged({"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, segments)
        # The same operations, in the same order, as torch's single-tensor AdamW (the CPU default).
        new = params.mul(1 - self.lr * self.weight_decay)
        bias1 = self._per_element(segments, lambda step: 1 - beta1**step)
        bias2_sqrt = self._per_element(segments, lambda step: math.sqrt(1 - beta2**step))
        denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(self.eps)
        if isinstance(bias1, float):
            new.addcdiv_(exp_avg, denom, value=-(self.lr / bias1))
        else:  # elements at different steps (state partly handed over, partly fresh)
            new.sub_((self.lr / bias1) * (exp_avg / denom))
        return params - new, staged

    def _check(self, params: torch.Tensor, grad: torch.Tensor) -> None:
        for name, t in (("params", params), ("grad", grad)):
            if t.shape != (self.numel,) or t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32 of shape ({self.numel},), got {t.dtype} {tuple(t.shape)}")


class LocalAdamW:
    """``torch.optim.AdamW`` for a peer's own parameters (the diloco inner steps): torch's single-tensor CPU
    algorithm, operation for operation, so the results are bit-identical.

    Not a ``torch.optim.Optimizer``: constructing one imports TorchDynamo, about 3 s of CPU, which a restarted
    peer would pay on its way back into the swarm (three times that on a machine its peers keep busy).
    """

    def __init__(
        self, params: Sequence[torch.Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.01,
    ) -> None:  # fmt: skip
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.steps = [0] * len(self.params)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad, exp_avg, exp_avg_sq = p.grad, self.exp_avg[i], self.exp_avg_sq[i]
            self.steps[i] += 1
            step = float(self.steps[i])
            if self.weight_decay != 0:
                p.mul_(1 - self.lr * self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = self.lr / (1 - beta1**step)
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)


class ShardedNesterov(ShardState):
    """The DiLoCo outer optimizer for one shard: SGD with Nesterov momentum on averaged pseudo-gradients."""

    buffer_names = ("momentum",)

    def __init__(self, *, lr: float = 0.7, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr, self.momentum = lr, momentum

    def compute(self, params: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Staged]:
        """The update ``u = lr * (g + mu * buf')`` with ``buf' = mu * buf + g`` (torch's SGD, first step
        included: there the buffer starts as ``g``, which ``mu * 0 + g`` equals)."""
        if grad.shape != (self.numel,):
            raise ValueError(f"grad must have shape ({self.numel},), got {tuple(grad.shape)}")
        first = all(step == 0 for _, _, step in self.segments)
        buf = grad.clone() if first else self.buffers["momentum"].mul(self.momentum).add_(grad)
        update = grad.add(buf, alpha=self.momentum).mul_(self.lr)
        segments = [(lo, hi, step + 1) for lo, hi, step in self.segments]
        return update, Staged({"momentum": buf}, segments)


def _clip(segments: list[Segment], lo: int, hi: int) -> list[Segment]:
    return [(max(a, lo), min(b, hi), s) for a, b, s in segments if min(b, hi) > max(a, lo)]


def _gaps(start: int, end: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    gaps, at = [], start
    for lo, hi in sorted(covered):
        if lo > at:
            gaps.append((at, lo))
        at = max(at, hi)
    if at < end:
        gaps.append((at, end))
    return gaps


def _merge(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for lo, hi, step in segments:
        if merged and merged[-1][1] == lo and merged[-1][2] == step:
            merged[-1] = (merged[-1][0], hi, step)
        else:
            merged.append((lo, hi, step))
    return merged
