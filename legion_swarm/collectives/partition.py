"""The partition a round uses, as the collectives see it: the plan itself (which member owns which contiguous
shard of the flat parameter space) lives in :mod:`legion_swarm.groups.partition`, below the collectives, because
a round's layout needs it too; it is re-exported here with the helpers that flatten a list of tensors into one
buffer and back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from legion_swarm.groups.partition import PartitionPlan, ShardSlice, chunk_bounds, group_plan, plan_partition

__all__ = [
    "PartitionPlan",
    "ShardSlice",
    "chunk_bounds",
    "flatten",
    "group_plan",
    "plan_partition",
    "unflatten_into",
]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the tensors, flattened, into one new contiguous 1-D float32 tensor (a copy)."""
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy a flat buffer (as made by :func:`flatten`) back into ``tensors`` in place, casting dtypes."""
    total = sum(t.numel() for t in tensors)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat buffer of shape {tuple(flat.shape)} does not match {total} elements")
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view(t.shape))
            offset += n
