"""Sharded optimizers against torch's own: AdamW and Nesterov SGD, whole and cut into shards, across rebases."""

from __future__ import annotations

import pytest
import torch

from legion_swarm.train.optim import LocalAdamW, ShardedAdamW, ShardedNesterov

ADAM = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def torch_adamw_trajectory(p0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    param = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([param], **ADAM)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    return param.detach()


def sharded_trajectory(
    p0: torch.Tensor, grads: list[torch.Tensor], bounds: list[list[tuple[int, int]]]
) -> tuple[torch.Tensor, list[int]]:
    """Run the grads through per-owner ShardedAdamW states, re-partitioning to ``bounds[step]`` each step, with
    state handed over between owners like the swarm does."""
    params = p0.clone()
    owners = [ShardedAdamW(**ADAM) for _ in range(max(len(b) for b in bounds))]
    fresh_counts = []
    for step, g in enumerate(grads):
        plan = bounds[step]
        handed = [s for o in owners if (s := o.export(o.start, o.end)) is not None]
        fresh_counts.append(sum(owners[r].rebase(lo, hi, handed) for r, (lo, hi) in enumerate(plan)))
        for r, (lo, hi) in enumerate(plan):
            update, staged = owners[r].compute(params[lo:hi].clone(), g[lo:hi].clone())
            owners[r].commit(staged)
            params[lo:hi] -= update
    return params, fresh_counts


def make(n: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), [torch.randn(n, generator=gen) for _ in range(steps)]


def test_one_shard_equals_torch_adamw() -> None:
    p0, grads = make(1000, 20)
    got, fresh = sharded_trajectory(p0, grads, [[(0, 1000)]] * 20)
    torch.testing.assert_close(got, torch_adamw_trajectory(p0, grads), rtol=0, atol=1e-6)
    assert fresh[0] == 1000 and sum(fresh[1:]) == 0


def test_shards_with_handover_equal_torch_adamw() -> None:
    p0, grads = make(1000, 12, seed=1)
    # 2 owners, then 3 (a member joins), then 2 again: state is handed over, nothing restarts.
    plans = [[(0, 500), (500, 1000)]] * 4 + [[(0, 320), (320, 640), (640, 1000)]] * 4 + [[(0, 600), (600, 1000)]] * 4
    got, fresh = sharded_trajectory(p0, grads, plans)
    torch.testing.assert_close(got, torch_adamw_trajectory(p0, grads), rtol=0, atol=1e-6)
    assert fresh == [1000] + [0] * 11


def test_rebase_without_donor_restarts_only_the_lost_elements() -> None:
    p0, grads = make(100, 3, seed=2)
    opt = ShardedAdamW(**ADAM)
    opt.rebase(0, 60)
    for g in grads:
        _, staged = opt.compute(p0[:60].clone(), g[:60].clone())
        opt.commit(staged)
    assert opt.rebase(30, 100) == 40  # 30..60 kept, 60..100 fresh
    assert opt.segments == [(30, 60, 3), (60, 100, 0)]
    assert torch.count_nonzero(opt.buffers["exp_avg"][30:]) == 0
    assert torch.count_nonzero(opt.buffers["exp_avg"][:30]) == 30
    # Mixed steps: the fresh elements get step-1 bias correction, the kept ones step 4; compare each part.
    update, _ = opt.compute(p0[30:].clone(), grads[0][30:].clone())
    whole = ShardedAdamW(**ADAM)
    whole.rebase(30, 100)
    fresh_update, _ = whole.compute(p0[30:].clone(), grads[0][30:].clone())
    torch.testing.assert_close(update[30:], fresh_update[30:])
    assert not torch.allclose(update[:30], fresh_update[:30])


def test_compute_stages_without_modifying_state() -> None:
    opt = ShardedAdamW(**ADAM)
    opt.rebase(0, 10)
    before = {k: v.clone() for k, v in opt.buffers.items()}
    opt.compute(torch.ones(10), torch.ones(10))
    assert all(torch.equal(before[k], opt.buffers[k]) for k in before) and opt.segments == [(0, 10, 0)]
    with pytest.raises(ValueError, match="shape"):
        opt.compute(torch.ones(9), torch.ones(9))


def test_nesterov_equals_torch_sgd() -> None:
    p0, grads = make(300, 6, seed=3)
    param = torch.nn.Parameter(p0.clone())
    ref = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    ours = ShardedNesterov(lr=0.7, momentum=0.9)
    ours.rebase(0, 300)
    mine = p0.clone()
    for g in grads:
        param.grad = g.clone()
        ref.step()
        update, staged = ours.compute(mine, g.clone())
        ours.commit(staged)
        mine = mine - update
    torch.testing.assert_close(mine, param.detach(), rtol=0, atol=1e-5)


def test_state_bytes_shrink_with_the_shard() -> None:
    whole, part = ShardedAdamW(**ADAM), ShardedAdamW(**ADAM)
    whole.rebase(0, 4000)
    part.rebase(1000, 2000)
    assert whole.nbytes() == 4000 * 8 and part.nbytes() * 4 == whole.nbytes()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_local_adamw_is_bit_identical_to_torch_adamw(weight_decay: float) -> None:
    gen = torch.Generator().manual_seed(7)
    shapes = [(13, 5), (5,), (3, 4, 2)]
    theirs = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    config = {**ADAM, "weight_decay": weight_decay}
    reference, local = torch.optim.AdamW(theirs, **config), LocalAdamW(ours, **config)
    for step in range(25):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for params, opt in ((theirs, reference), (ours, local)):
            opt.zero_grad()
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                if step % 5 == 3 and i == 1:
                    p.grad = None  # a parameter without a gradient this step is left alone, its step count too
                else:
                    p.grad = g.clone()
            opt.step()
    for a, b in zip(theirs, ours, strict=True):
        assert torch.equal(a, b)
