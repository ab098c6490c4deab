"""Partition plan: the flat parameter space of a list of tensors cut into G contiguous shards.

A group of G members agrees on who owns which part of the model by each computing the same
:class:`PartitionPlan` from the same inputs (tensor sizes, member weights such as bandwidth). The plan
is therefore a pure function of its arguments and uses exact rational arithmetic only: no float sum
whose value depends on evaluation order, no platform-dependent rounding.

Picture, for tensors of 100, 30 and 0 elements cut into 2 shards with ``align=64``::

    flat index   0 ................................ 64 ........................ 130
    tensors      [ tensor 0 (100)                        ][ tensor 1 (30) ]
    shards       [ shard 0: 0..64          ][ shard 1: 64..130                   ]

Shard 1 spans two tensors, tensor 0 spans two shards; :meth:`PartitionPlan.slices_for` gives the
pieces. All sizes and indices are in elements, never bytes.

The plan lives with the groups because a round's layout (:mod:`legion_swarm.groups.layout`) derives who keeps
which optimizer state from it; the collectives use the same plan, and :func:`chunk_bounds`, to cut each shard
into the chunks they send.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import operator
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from typing import NamedTuple

import torch

from legion_swarm.errors import ConfigError
from legion_swarm.groups.info import GroupInfo

logger = logging.getLogger(__name__)

__all__ = ["PartitionPlan", "ShardSlice", "chunk_bounds", "group_plan", "plan_partition"]


class ShardSlice(NamedTuple):
    """One piece of a shard: ``tensor[start:end]`` (flattened) is ``shard[shard_start:shard_start + end - start]``."""

    tensor: int
    start: int
    end: int
    shard_start: int


@dataclass(frozen=True)
class PartitionPlan:
    """Contiguous shards over the concatenation of flattened tensors.

    Invariants (checked by the tests): ``bounds[0][0] == 0``, ``bounds[-1][1] == total``, each shard
    starts where the previous one ends, every start is a multiple of ``align``.
    """

    numels: tuple[int, ...]
    """Element count of each tensor, in order."""
    align: int
    """Every shard start is a multiple of this many elements (only the last end may be unaligned)."""
    bounds: tuple[tuple[int, int], ...]
    """``(start, end)`` of each shard in the flat index space, end exclusive."""

    @property
    def total(self) -> int:
        """Elements in all tensors together."""
        return self.bounds[-1][1]

    @property
    def n_shards(self) -> int:
        return len(self.bounds)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Elements per shard."""
        return tuple(end - start for start, end in self.bounds)

    @cached_property
    def _offsets(self) -> tuple[int, ...]:
        # offsets[i] = flat index of tensor i's first element; one extra entry = total.
        return (0, *itertools.accumulate(self.numels))

    @cached_property
    def _starts(self) -> tuple[int, ...]:
        return tuple(start for start, _ in self.bounds)

    def shard_of(self, index: int) -> int:
        """The shard holding flat element ``index`` (empty shards hold nothing); IndexError if out of range."""
        if not 0 <= index < self.total:
            raise IndexError(f"flat index {index} outside [0, {self.total})")
        # Empty shards share their start with the next shard; bisect_right skips past them.
        return bisect_right(self._starts, index) - 1

    def slices_for(self, shard: int) -> list[ShardSlice]:
        """How shard ``shard`` maps onto the tensors, in order; empty tensors never appear."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} outside [0, {self.n_shards})")
        start, end = self.bounds[shard]
        pieces: list[ShardSlice] = []
        if start == end:
            return pieces
        offsets = self._offsets
        i = bisect_right(offsets, start) - 1
        while i < len(self.numels) and offsets[i] < end:
            lo, hi = max(start, offsets[i]), min(end, offsets[i + 1])
            if hi > lo:
                pieces.append(ShardSlice(i, lo - offsets[i], hi - offsets[i], lo - start))
            i += 1
        return pieces

    def shard_values(self, tensors: Sequence[torch.Tensor], shard: int) -> torch.Tensor:
        """Shard ``shard`` of ``tensors`` as a 1-D float32 tensor: a view when it lies in one tensor (no copy of
        what a round sends or reduces), else a copy (:meth:`extract`)."""
        pieces = self.slices_for(shard)
        if len(pieces) == 1:
            piece = pieces[0]
            return tensors[piece.tensor].detach().reshape(-1)[piece.start : piece.end]
        return self.extract(tensors, shard)

    def extract(self, tensors: Sequence[torch.Tensor], shard: int) -> torch.Tensor:
        """Copy shard ``shard`` out of ``tensors`` into a new contiguous 1-D float32 tensor."""
        self._check_tensors(tensors)
        out = torch.empty(self.sizes[shard], dtype=torch.float32, device=_device(tensors))
        for piece in self.slices_for(shard):
            flat = tensors[piece.tensor].detach().reshape(-1)
            out[piece.shard_start : piece.shard_start + piece.end - piece.start] = flat[piece.start : piece.end]
        return out

    def assign(self, tensors: Sequence[torch.Tensor], shard: int, values: torch.Tensor) -> None:
        """Write ``values`` (1-D, shard ``shard``'s size) into the matching places of ``tensors``, in place."""
        self._check_tensors(tensors)
        if values.dim() != 1 or values.numel() != self.sizes[shard]:
            raise ValueError(f"shard {shard} holds {self.sizes[shard]} elements, got shape {tuple(values.shape)}")
        with torch.no_grad():
            for piece in self.slices_for(shard):
                target = tensors[piece.tensor]
                if not target.is_contiguous():
                    raise ValueError(f"tensor {piece.tensor} is not contiguous; cannot write through a view")
                chunk = values[piece.shard_start : piece.shard_start + piece.end - piece.start]
                target.view(-1)[piece.start : piece.end] = chunk

    def _check_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        got = tuple(t.numel() for t in tensors)
        if got != self.numels:
            raise ValueError(f"plan is for tensors of sizes {self.numels}, got {got}")


def plan_partition(
    numels: Sequence[int],
    n_shards: int,
    weights: Sequence[float] | None = None,
    align: int = 64,
) -> PartitionPlan:
    """Cut ``sum(numels)`` elements into ``n_shards`` contiguous shards sized in proportion to ``weights``.

    Boundary ``i`` (the start of shard ``i``) is the exact ideal cumulative share
    ``total * (w_0 + ... + w_{i-1}) / sum(w)`` rounded *down* to a multiple of ``align``, computed with
    :class:`fractions.Fraction` (every float is an exact rational). Hence:

    - each boundary is within ``[0, align)`` elements below its ideal, so every shard's size differs
      from its ideal share ``total * w_i / sum(w)`` by strictly less than ``align`` elements;
    - the last shard ends at ``total`` exactly (the only unaligned boundary);
    - with equal weights no shard is empty once ``total >= n_shards * align``; with unequal weights a
      shard is non-empty whenever its ideal share is at least ``align``. Below that, leading shards
      may be empty (size 0) and the tail of the space goes to the later shards;
    - identical inputs give identical plans on every machine.

    Raises :class:`ConfigError` for ``n_shards < 1``, ``align < 1``, a negative or non-integer numel,
    or weights of the wrong length, not finite or not positive.
    """
    numels = tuple(_check_int(n, "numel", minimum=0) for n in numels)
    n_shards = _check_int(n_shards, "n_shards", minimum=1)
    align = _check_int(align, "align", minimum=1)
    if weights is None:
        exact = [Fraction(1)] * n_shards
    else:
        weights = list(weights)
        if len(weights) != n_shards:
            raise ConfigError(f"got {len(weights)} weights for {n_shards} shards")
        exact = []
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"shard weights must be finite and positive, got {w!r}")
            exact.append(Fraction(float(w)) if not isinstance(w, (int, Fraction)) else Fraction(w))
    total = sum(numels)
    weight_sum = sum(exact)
    starts = [0]
    cumulative = Fraction(0)
    for w in exact[:-1]:
        cumulative += w
        # floor(total * cumulative / weight_sum / align) * align, in exact rationals.
        starts.append(math.floor(total * cumulative / (weight_sum * align)) * align)
    bounds = tuple(zip(starts, [*starts[1:], total], strict=True))
    plan = PartitionPlan(numels=numels, align=align, bounds=bounds)
    logger.debug("partition of %d elements into %d shards: sizes %s", total, n_shards, plan.sizes)
    return plan


def group_plan(group: GroupInfo, numels: Sequence[int]) -> PartitionPlan:
    """The partition a round of ``group`` uses for tensors of ``numels`` elements: rank ``s`` owns shard ``s``,
    sized by the members' bandwidths. Callers that keep per-shard state (a sharded optimizer) use it to
    prepare that state before the round starts. With ``group.owners`` set, only the first ``owners`` ranks own
    (equal) shards and the other ranks' shards are empty, at the end of the space."""
    if group.owners is None:
        return plan_partition(numels, group.size, [m.bandwidth for m in group.members])
    owned = plan_partition(numels, group.owners)
    total = owned.total
    empty = ((total, total),) * (group.size - group.owners)
    return PartitionPlan(numels=owned.numels, align=owned.align, bounds=owned.bounds + empty)


def chunk_bounds(size: int, chunk: int) -> list[tuple[int, int]]:
    """(offset, length) of each chunk of a shard of ``size`` elements cut every ``chunk`` elements; an empty shard
    still has one empty chunk (a round sends it: it carries the contribution's weight)."""
    return [(o, min(chunk, size - o)) for o in range(0, size, chunk)] or [(0, 0)]


def _check_int(value: object, what: str, *, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # accepts numpy integers, refuses floats
    except TypeError:
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {value}")
    return value


def _device(tensors: Sequence[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")
