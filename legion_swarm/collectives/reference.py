"""Naive single-process oracles the distributed collectives are tested against.

:func:`weighted_average` *is* the definition of a round's average: the owner of a shard computes exactly
this on its slice of every contribution, in rank order. Each step is one elementwise float32 operation
(multiply, add, multiply), rounded once per element whichever SIMD path computes it, so the distributed
result of the lossless codec equals the oracle bit for bit, not just within a tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_average(contributions: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``sum(w_i * x_i) / sum(w_i)`` over ``(x_i, w_i)`` in the given order, as a new float32 tensor.

    Division is a multiplication by ``1 / sum(w)`` (a Python double, rounded to float32 by torch), so
    every element goes through the same three kinds of rounding on any CPU."""
    if not contributions:
        raise ValueError("nothing to average")
    first, w0 = contributions[0]
    acc = first.to(torch.float32).mul(w0)
    scratch = torch.empty_like(acc)
    for x, w in contributions[1:]:
        torch.mul(x, w, out=scratch)
        acc.add_(scratch)
    total = sum(w for _, w in contributions)
    return acc.mul_(1.0 / total)


def reference_all_reduce(inputs: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> list[torch.Tensor]:
    """What an all-reduce of every member's tensors (``inputs[rank]``) must produce: the weighted average
    of each tensor across members, in rank order."""
    n_tensors = len(inputs[0])
    return [
        weighted_average([(inputs[r][t].reshape(-1), weights[r]) for r in range(len(inputs))]).view_as(inputs[0][t])
        for t in range(n_tensors)
    ]
