"""Naive single-process oracles the swarm's training modes are tested against.

- :func:`reference_sync`: one ``torch.optim.AdamW`` on every peer's batch of a step at once (N x batch).
- :func:`reference_diloco`: N simulated workers in one process, each with its own model copy and inner
  AdamW, and one ``torch.optim.SGD(nesterov=True)`` outer step on the sample-weighted average of how far
  the workers moved.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from legion_swarm.collectives.reference import weighted_average
from legion_swarm.config import TrainConfig
from legion_swarm.train.modes import Batch, forward_backward, trainable


def reference_sync(model: torch.nn.Module, steps: Sequence[Sequence[Batch]], config: TrainConfig) -> list[float]:
    """Train ``model`` in place: step ``t`` uses the concatenation of ``steps[t]`` (one batch per peer, equal
    sizes, so the mean loss over all of them is the mean of the peers' means). Returns the losses."""
    optimizer = torch.optim.AdamW(trainable(model), **config.adamw())
    losses = []
    for batches in steps:
        inputs = torch.cat([x for x, _ in batches])
        targets = torch.cat([y for _, y in batches])
        optimizer.zero_grad(set_to_none=False)
        losses.append(forward_backward(model, (inputs, targets)))
        optimizer.step()
    return losses


def reference_diloco(
    model: torch.nn.Module, rounds: Sequence[Sequence[Sequence[Batch]]], config: TrainConfig,
    lr_at: Callable[[int], float] | None = None,
) -> torch.nn.Module:  # fmt: skip
    """Train ``model`` (the global parameters) in place: ``rounds[k][w]`` are worker ``w``'s inner batches in
    outer round ``k``. Inner AdamW state persists per worker across rounds, as it does on a peer. ``lr_at``:
    the inner learning rate of each worker's 0-based local step (default: ``config.lr`` throughout)."""
    global_params = trainable(model)
    outer = torch.optim.SGD(global_params, lr=config.outer_lr, momentum=config.outer_momentum, nesterov=True)
    n_workers = len(rounds[0])
    workers = [copy.deepcopy(model) for _ in range(n_workers)]
    inner = [torch.optim.AdamW(trainable(w), **config.adamw()) for w in workers]
    local_steps = [0] * n_workers
    for per_worker in rounds:
        samples = []
        for w, (worker, optimizer, batches) in enumerate(zip(workers, inner, per_worker, strict=True)):
            for batch in batches:
                if lr_at is not None:
                    _set_lr(optimizer, lr_at(local_steps[w]))
                local_steps[w] += 1
                optimizer.zero_grad(set_to_none=False)
                forward_backward(worker, batch)
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable(worker), config.grad_clip)
                optimizer.step()
            samples.append(float(sum(int(x.shape[0]) for x, _ in batches)))
        for i, g in enumerate(global_params):
            deltas = [(g.detach() - trainable(w)[i].detach(), s) for w, s in zip(workers, samples, strict=True)]
            g.grad = weighted_average(deltas)
        outer.step()
        for worker in workers:
            with torch.no_grad():
                for p, g in zip(trainable(worker), global_params, strict=True):
                    p.copy_(g)
    return model


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
