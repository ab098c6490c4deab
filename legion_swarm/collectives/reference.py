"""Naive single-process oracles the distributed collectives are tested against.

:func:`weighted_average` *is* the definition of a round's average: the owner of a shard computes exactly
this on its slice of every contribution, in rank order. Each step is one elementwise float32 operation
(multiply, add, multiply), rounded once per element whichever SIMD path computes it, so the distributed
result of the lossless codec equals the oracle bit for bit, not just within a tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_average(
    contributions: Sequence[tuple[torch.Tensor, float]], *, out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``sum(w_i * x_i) / sum(w_i)`` over ``(x_i, w_i)`` in the given order, in float32.

    Division is a multiplication by ``1 / sum(w)`` (a Python double, rounded to float32 by torch), so
    every element goes through the same three kinds of rounding on any CPU. ``out`` / ``scratch``: float32
    buffers of the inputs' size to reuse (freshly allocated memory costs a page fault per 4 KiB)."""
    if not contributions:
        raise ValueError("nothing to average")
    first, w0 = contributions[0]
    acc = torch.empty_like(first, dtype=torch.float32) if out is None else out
    # Multiplying by exactly 1.0 is the identity on finite floats: skipped, a pass over memory saved; so is
    # copying the first contribution before adding the second (x0 + x1 rounds the same either way).
    rest = contributions[1:]
    if w0 == 1.0 and rest and rest[0][1] == 1.0:
        torch.add(first, rest[0][0], out=acc)
        rest = rest[1:]
    else:
        acc.copy_(first) if w0 == 1.0 else torch.mul(first, w0, out=acc)
    for x, w in rest:
        if w == 1.0:
            acc.add_(x)
        else:
            scratch = torch.empty_like(acc) if scratch is None else scratch
            acc.add_(torch.mul(x, w, out=scratch))
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
