"""Devices and precisions: the whole device path on an explicit ``torch.device``, autocast in bf16 and fp16 on
the CPU, and peers of different precisions (the CPU stand-in for different devices) bit-identical after a
round between real data planes. ``tests/test_cuda.py`` runs the same checks on a GPU where there is one."""

from __future__ import annotations

import time

import pytest
import torch

from legion_swarm.collectives import Collectives
from legion_swarm.config import CollectiveConfig, TrainConfig
from legion_swarm.errors import ConfigError
from legion_swarm.train.compute import Compute
from legion_swarm.train.device import (
    LossScaler,
    Placement,
    available_devices,
    check_precision,
    forward_backward,
    resolve_device,
)
from legion_swarm.train.loop import bandwidth_level, round_budget_s
from legion_swarm.train.modes import DiLoCoMode, SyncMode, trainable
from tests.helpers.collectives import FAST, planes
from tests.helpers.training import TinyLM, batches, flat, rounds_hold_the_same_bits

CPU = torch.device("cpu")


def test_devices_resolve_or_name_what_the_machine_has() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device(" CPU ") == CPU
    assert available_devices()[0] == "cpu"
    auto = resolve_device("auto")
    assert str(auto) == next((d for d in available_devices() if d != "cpu"), "cpu")
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(ConfigError, match="expected auto, cpu, cuda, cuda:N or mps"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device cuda is not available; this machine has: cpu"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="is not available"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")  # one past the last GPU (cuda:0 without any)
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="MPS needs macOS"):
            resolve_device("mps")


def test_precisions_are_checked() -> None:
    assert [check_precision(p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    for bad in ("fp8", "FP32", "float32"):
        with pytest.raises(ConfigError, match="expected one of fp32, bf16, fp16"):
            check_precision(bad)
    with pytest.raises(ConfigError):
        Placement(CPU, "int8")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_runs_the_pass_in_low_precision_with_float32_master_weights(precision: str) -> None:
    model = TinyLM()
    batch = batches(1, seed=3)[0]
    placement = Placement(CPU, precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with placement.autocast():
        logits, _ = model(*placement.batch(batch))
    assert logits.dtype == dtype

    reference = TinyLM()
    want = forward_backward(reference, batch)
    got = forward_backward(model, batch, placement)
    assert got != want  # a different precision computes different numbers...
    assert abs(got - want) < 0.05 * want  # ...close to float32's
    for p, r in zip(trainable(model), trainable(reference), strict=True):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, r.grad, rtol=0.1, atol=0.05)


def test_loss_scaler_skips_overflows_and_grows_after_good_steps() -> None:
    scaler = LossScaler(scale=8.0, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([8.0, 16.0, 24.0])
    assert scaler.unscale_([p])
    torch.testing.assert_close(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 16.0
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not scaler.unscale_([p])
    scaler.update(False)
    assert scaler.scale == 8.0 and scaler.skipped == 1


def test_fp16_loss_scale_keeps_small_gradients_from_underflowing() -> None:
    """Gradients of ~1e-8 are 0 in fp16 unless the loss is scaled: the scaled, unscaled gradients are close to
    float32's where the unscaled fp16 ones would vanish."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(4, 1, bias=False)

        def forward(self, x, y):
            out = self.w(x)
            return out, (out.float() * 1e-8).sum()

    x = (torch.ones(2, 4), torch.zeros(2))
    fp32 = Tiny()
    forward_backward(fp32, x)
    scaled = Tiny()
    scaled.load_state_dict(fp32.state_dict())
    scaler = LossScaler()
    forward_backward(scaled, x, Placement(CPU, "fp16"), scaler)
    assert scaler.unscale_(list(scaled.parameters()))
    torch.testing.assert_close(scaled.w.weight.grad, fp32.w.weight.grad, rtol=1e-2, atol=0)


@pytest.mark.parametrize("cls", [DiLoCoMode, SyncMode])
async def test_peers_of_different_precisions_hold_the_same_bits_after_each_round(cls: type) -> None:
    """fp32, bf16 and fp16 peers on an explicit device: their contributions differ, their committed state
    does not, round after round; and the model each computes with is a copy of that state."""
    config = TrainConfig(mode="diloco" if cls is DiLoCoMode else "sync", lr=3e-3, inner_steps=3)
    precisions = ["fp32", "bf16", "fp16"]
    async with planes(len(precisions)) as ps:
        models = [TinyLM() for _ in ps]
        modes = [
            cls(m, Collectives(p, CollectiveConfig(codec="none", **FAST)), config, placement=Placement(CPU, prec))
            for m, p, prec in zip(models, ps, precisions, strict=True)
        ]
        state = await rounds_hold_the_same_bits(modes, ps, models)
    assert not torch.equal(state, flat(TinyLM()))


async def test_a_late_diloco_member_keeps_its_work_on_the_new_anchor() -> None:
    """``load_state(keep_work=True)``: params = new anchor + (params - old anchor), the samples stay; without
    it, the model is the new anchor and the work is dropped."""
    async with planes(1) as ps:
        mode = DiLoCoMode(TinyLM(), Collectives(ps[0], CollectiveConfig(**FAST)), TrainConfig(lr=1e-2))
        for batch in batches(2, seed=1):
            await mode.inner_step(batch)
        old_anchor = torch.cat([a.reshape(-1) for a in mode.anchor]).clone()
        progress = flat(mode.model) - old_anchor
        new_anchor = old_anchor + 0.01
        mode.load_state(new_anchor, keep_work=True)
        assert mode.samples == 8 and mode.inner_steps == 2
        torch.testing.assert_close(flat(mode.model), new_anchor + progress, rtol=0, atol=1e-6)
        assert torch.equal(torch.cat([a.reshape(-1) for a in mode.anchor]), new_anchor)
        mode.load_state(old_anchor)
        assert mode.samples == 0 and torch.equal(flat(mode.model), old_anchor)


async def test_sync_accumulates_the_batches_of_a_round_into_their_mean_gradient() -> None:
    """A round by time in ``sync``: two batches' gradients averaged equal one pass on both batches (same
    sizes), weighted by both batches' samples."""
    config = TrainConfig(mode="sync", lr=1e-2, round_seconds=1.0, inner_steps=4)
    two = batches(2, seed=5)
    async with planes(1) as ps:
        mode = SyncMode(TinyLM(), Collectives(ps[0], CollectiveConfig(**FAST)), config)
        assert mode.local_steps == 4
        for batch in two:
            await mode.local_step(batch)
        grads, samples = mode._host_gradients()
    reference = TinyLM()
    forward_backward(reference, (torch.cat([b[0] for b in two]), torch.cat([b[1] for b in two])))
    assert samples == 8
    for g, p in zip(grads, trainable(reference), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_a_mode_refuses_a_model_on_another_device() -> None:
    with pytest.raises(ValueError, match="must be on meta"):
        DiLoCoMode(TinyLM(), None, TrainConfig(), placement=Placement(torch.device("meta")))  # type: ignore[arg-type]


async def test_compute_speed_throttles_the_thread_for_real() -> None:
    """``speed`` 0.25: each call is followed by 3x its own duration of sleep on the compute thread."""

    def spin() -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < 0.05:
            pass
        return time.perf_counter() - started

    compute = Compute(speed=0.25)
    try:
        started = time.perf_counter()
        ran = await compute.run(spin)
        assert time.perf_counter() - started >= 4 * ran
    finally:
        compute.close()
    with pytest.raises(ValueError, match="speed"):
        Compute(speed=0)


def test_a_round_budget_is_its_seconds_or_the_swarms_samples_over_its_rates() -> None:
    by_steps = TrainConfig()
    assert round_budget_s(by_steps, [10.0, 20.0]) is None
    assert round_budget_s(TrainConfig(round_seconds=5.0), []) == 5.0
    by_samples = TrainConfig(round_samples=300)
    assert round_budget_s(by_samples, []) is None  # no rate known yet: inner_steps steps this round
    assert round_budget_s(by_samples, [10.0, 20.0, 0.0]) == 10.0  # 300 samples at 30 samples/s
    both = TrainConfig(round_samples=300, round_seconds=4.0)
    assert round_budget_s(both, [10.0, 20.0]) == 4.0
    assert round_budget_s(both, [100.0, 200.0]) == 1.0
    with pytest.raises(ConfigError, match="round_samples"):
        TrainConfig(round_samples=0)
    with pytest.raises(ConfigError, match="round_seconds"):
        TrainConfig(round_seconds=-1.0)


def test_measured_bandwidth_is_announced_in_steps_of_root_two_and_sizes_the_shards() -> None:
    from legion_swarm.groups.partition import plan_partition

    assert bandwidth_level(10.0) == bandwidth_level(10.9) == 2**3.5  # noise does not move the partition
    assert bandwidth_level(10.0) < bandwidth_level(16.0) == 16.0
    assert bandwidth_level(0.0) > 0
    slow, fast = bandwidth_level(5.0), bandwidth_level(40.0)
    sizes = plan_partition([1 << 20], 2, [slow, fast]).sizes
    assert sizes[1] > 6 * sizes[0]  # a slow uplink owns a smaller shard (8x less bandwidth here)
