"""The training modes between real data planes in one process, against single-process references:
``sync`` against torch's AdamW with N x batch, ``diloco`` against a naive N-worker DiLoCo."""

from __future__ import annotations

import asyncio
import copy
import os

import pytest
import torch

from legion_swarm.collectives import Collectives, FaultPlan, InjectedCrash, RoundResult, group_plan
from legion_swarm.config import CollectiveConfig, TrainConfig
from legion_swarm.config.train import MODES
from legion_swarm.errors import ConfigError
from legion_swarm.groups import GroupInfo, GroupMember
from legion_swarm.train.compute import Compute
from legion_swarm.train.modes import (
    MODE_CLASSES,
    Batch,
    DiLoCoMode,
    RoundOutcome,
    SyncMode,
    TrainingMode,
    create_mode,
    forward_backward,
    trainable,
)
from legion_swarm.train.phases import TRANSITIONS, Phase, run_phases
from legion_swarm.train.reference import reference_diloco, reference_sync
from legion_swarm.transport.dataplane import DataPlane
from tests.helpers.collectives import planes
from tests.helpers.training import TinyLM, batches, flat, make_modes


def group_of(ps: list[DataPlane]) -> GroupInfo:
    return GroupInfo(
        round_id=os.urandom(8), members=tuple(GroupMember(peer_id=p.identity.peer_id, direct=p.endpoint) for p in ps)
    )


@pytest.mark.parametrize("n_peers", [2, 4])
async def test_sync_equals_single_process_adamw_with_n_times_the_batch(n_peers: int) -> None:
    config = TrainConfig(mode="sync", lr=1e-2, weight_decay=0.05)
    steps = 20
    data = [batches(n_peers, seed=100 + t) for t in range(steps)]  # data[t][r]
    reference = TinyLM()
    ref_losses = reference_sync(reference, data, config)

    async with planes(n_peers) as ps:
        models = [TinyLM() for _ in ps]
        modes = make_modes(SyncMode, models, ps, "none", config)
        losses = []
        for t in range(steps):
            group = group_of(ps)
            outcomes = await asyncio.gather(*(mode.step(group, data[t][r]) for r, mode in enumerate(modes)))
            assert all(o.result.complete and o.in_sync for o, _ in outcomes)
            losses.append(sum(loss for _, loss in outcomes) / n_peers)

    for model in models[1:]:  # every peer holds bit-identical parameters
        for a, b in zip(trainable(model), trainable(models[0]), strict=True):
            assert torch.equal(a, b)
    for got, want in zip(trainable(models[0]), trainable(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert losses[-1] < 0.9 * losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)

    # ZeRO: each peer holds the AdamW moments of its shard only, about 1/N of torch's.
    reference_state = sum(p.numel() for p in trainable(reference)) * 2 * 4
    held = [mode.optimizer.nbytes() for mode in modes]
    assert sum(held) == reference_state
    for nbytes in held:
        assert abs(nbytes - reference_state / n_peers) <= 64 * 2 * 4  # shard starts align to 64 elements


async def run_diloco(plan: list, config: TrainConfig, codec: str) -> tuple[list[TinyLM], list[list[int]]]:
    """``plan[k][r]``: member r's inner batches in outer round k. Returns the models and the samples each member
    contributed per round; every round must be complete."""
    samples = []
    async with planes(len(plan[0])) as ps:
        models = [TinyLM() for _ in ps]
        modes = make_modes(DiLoCoMode, models, ps, codec, config)
        for per_member in plan:
            for mode, member_batches in zip(modes, per_member, strict=True):
                for batch in member_batches:
                    await mode.inner_step(batch)
            group = group_of(ps)
            outcomes = await asyncio.gather(*(mode.outer_step(group) for mode in modes))
            assert all(o.result.complete for o in outcomes)
            samples.append([o.samples for o in outcomes])
    return models, samples


async def test_diloco_equals_a_naive_diloco_reference() -> None:
    n_peers, rounds, inner = 3, 3, 4
    config = TrainConfig(mode="diloco", lr=3e-3, inner_steps=inner, outer_lr=0.7, outer_momentum=0.9)
    # Unequal sample counts: peer r trains r + 1 fewer steps in round 1, so the sample weights matter.
    plan = [[batches(inner - (k == 1) * r, seed=1000 * k + 10 * r) for r in range(n_peers)] for k in range(rounds)]
    reference = reference_diloco(TinyLM(), plan, config)

    models, samples = await run_diloco(plan, config, "none")
    assert samples == [[sum(len(x) for x, _ in plan[k][r]) for r in range(n_peers)] for k in range(rounds)]

    for model in models[1:]:
        for a, b in zip(trainable(model), trainable(models[0]), strict=True):
            assert torch.equal(a, b)
    for got, want in zip(trainable(models[0]), trainable(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    moved = sum(
        float((a - b).detach().abs().sum()) for a, b in zip(trainable(models[0]), trainable(TinyLM()), strict=True)
    )
    assert moved > 1.0  # the outer steps changed the model


async def test_diloco_int8_keeps_members_identical_and_close_to_the_reference() -> None:
    n_peers, rounds, inner = 2, 3, 3
    config = TrainConfig(mode="diloco", lr=3e-3, inner_steps=inner)
    plan = [[batches(inner, seed=7 * k + r) for r in range(n_peers)] for k in range(rounds)]
    reference = reference_diloco(TinyLM(), plan, config)
    models, _ = await run_diloco(plan, config, "int8")
    for a, b, want in zip(trainable(models[0]), trainable(models[1]), trainable(reference), strict=True):
        assert torch.equal(a, b)
        # int8 errs on the update (about lr * |delta| / 127 per element), not on the weights themselves.
        assert float((a - want).detach().abs().max()) < 2e-3


async def test_a_lost_shard_keeps_its_value_and_its_optimizer_state() -> None:
    config = TrainConfig(mode="sync", lr=1e-2)
    data = batches(3, seed=5)
    crash = FaultPlan(phase="after_reduce", kind="kill", in_process=True)  # rank 2 dies holding its shard
    async with planes(3) as ps:
        models = [TinyLM() for _ in ps]
        modes = make_modes(SyncMode, models, ps, "none", config)
        before = flat(models[0]).clone()
        group = group_of(ps)
        outcomes = await asyncio.gather(
            modes[0].step(group, data[0]),
            modes[1].step(group, data[1]),
            modes[2].step(group, data[2], faults=crash),
            return_exceptions=True,
        )
    assert isinstance(outcomes[2], InjectedCrash)
    for outcome, _ in outcomes[:2]:
        assert outcome.result.missing_shards == (2,) and outcome.in_sync
    plan = outcomes[0][0].result.plan
    lo, hi = plan.bounds[2]
    after = flat(models[0])
    assert torch.equal(after[lo:hi], before[lo:hi]) and not torch.equal(after[:lo], before[:lo])
    assert torch.equal(after, flat(models[1]))
    assert modes[0].optimizer.segments == [(*plan.bounds[0], 1)]  # the survivors' owners stepped
    assert modes[2].optimizer.segments == [(lo, hi, 0)]  # the dead owner's state was never advanced


def test_models_start_identical() -> None:
    a, b = TinyLM(), copy.deepcopy(TinyLM())
    assert all(torch.equal(x, y) for x, y in zip(trainable(a), trainable(b), strict=True))


async def test_every_configured_mode_has_a_class_and_gets_its_compute_at_construction() -> None:
    assert set(MODE_CLASSES) == set(MODES)
    compute = Compute()
    try:
        async with planes(1) as ps:
            collectives = Collectives(ps[0], CollectiveConfig())
            for name, cls, steps in (("sync", SyncMode, 1), ("diloco", DiLoCoMode, 7)):
                config = TrainConfig(mode=name, inner_steps=7)
                mode = create_mode(name, TinyLM(), collectives, config, compute=compute)
                assert type(mode) is cls and isinstance(mode, TrainingMode)
                assert mode.compute is compute and mode.local_steps == steps  # type: ignore[attr-defined]
            with pytest.raises(ConfigError, match="no training mode 'adam'"):
                create_mode("adam", TinyLM(), collectives, TrainConfig(), compute=compute)
    finally:
        compute.close()


class ToyMode:
    """A third mode that only implements the protocol: local SGD, and a "round" of one member that keeps its own
    parameters (no network). ``local_steps`` batches per round."""

    join_idle_after_resync = False

    def __init__(
        self, model: torch.nn.Module, collectives: Collectives, config: TrainConfig, *, compute: Compute | None = None,
        placement: object = None,
    ) -> None:  # fmt: skip
        self.model, self.config, self.compute = model, config, compute
        self.params = trainable(model)
        self.numels = [p.numel() for p in self.params]
        self.optimizer = None  # no sharded optimizer state to hand over
        self.samples = 0

    @property
    def local_steps(self) -> int:
        return 2

    async def local_step(self, batch: Batch) -> float:
        return self.compute_step(batch)

    def compute_step(self, batch: Batch) -> float:
        self.model.zero_grad(set_to_none=False)
        loss = forward_backward(self.model, batch)
        with torch.no_grad():
            for p in self.params:
                p.sub_(self.config.lr * p.grad)
        self.samples += int(batch[0].shape[0])
        return loss

    def my_range(self, layout: object) -> tuple[int, int]:
        return 0, sum(self.numels)

    async def round(self, layout: GroupInfo, *, handed: object = (), faults: object = None) -> RoundOutcome:
        plan = group_plan(layout, self.numels)
        result = RoundResult(
            rank=0, group=layout, plan=plan, committed=(0,), missing_shards=(), faulty=(), contributors={0: (0,)},
            excluded={}, shard=None, planes={}, timings={}, bytes_sent=3, bytes_received=5,
        )  # fmt: skip
        samples, self.samples = self.samples, 0
        return RoundOutcome(result=result, samples=samples, fresh_state=0)

    def state_tensors(self) -> list[torch.Tensor]:
        return [p.data for p in self.params]

    def load_state(self, flat: torch.Tensor, *, keep_work: bool = False) -> None:
        raise NotImplementedError


async def test_a_third_mode_is_one_class_and_one_registry_entry_and_drives_the_round_phases(monkeypatch) -> None:
    class NotAMode:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

    monkeypatch.setitem(MODE_CLASSES, "toy", ToyMode)
    monkeypatch.setitem(MODE_CLASSES, "broken", NotAMode)
    config = TrainConfig(mode="sync", lr=0.1)
    with pytest.raises(TypeError, match="does not fulfil the TrainingMode protocol"):
        create_mode("broken", TinyLM(), None, config)  # type: ignore[arg-type]
    mode = create_mode("toy", TinyLM(), None, config)  # type: ignore[arg-type]
    assert isinstance(mode, ToyMode)

    # The loop's phases, without a network: what each phase asks of the mode, in the loop's order.
    group = GroupInfo(round_id=b"toy-0001", members=(GroupMember(peer_id="toy-peer"),))
    data = iter(batches(6, seed=9))
    losses: list[float] = []
    outcomes: list[RoundOutcome] = []
    seen: list[Phase] = []

    async def local_work() -> Phase:
        losses.extend([await mode.local_step(next(data)) for _ in range(mode.local_steps)])
        return Phase.GROUP

    async def sharded_step() -> Phase:
        outcomes.append(await mode.round(group, handed=()))
        return Phase.COMMIT if outcomes[-1].result.committed else Phase.FAILED

    async def to(phase: Phase) -> Phase:
        return phase

    async def report() -> Phase:
        return Phase.DONE if len(outcomes) == 3 else Phase.LOCAL_WORK

    handlers = {
        Phase.LOCAL_WORK: local_work,
        Phase.GROUP: lambda: to(Phase.HAND_OVER),
        Phase.HAND_OVER: lambda: to(Phase.SHARDED_STEP),
        Phase.SHARDED_STEP: sharded_step,
        Phase.COMMIT: lambda: to(Phase.REPORT),
        Phase.REPORT: report,
    }
    await run_phases(handlers, Phase.LOCAL_WORK, on_enter=seen.append)
    one_round = [Phase.LOCAL_WORK, Phase.GROUP, Phase.HAND_OVER, Phase.SHARDED_STEP, Phase.COMMIT, Phase.REPORT]
    assert seen == one_round * 3 + [Phase.DONE]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [(o.samples, o.bytes_sent, o.bytes_received) for o in outcomes] == [(8, 3, 5)] * 3


async def test_the_phase_machine_refuses_a_transition_it_does_not_have() -> None:
    assert all(nxt in TRANSITIONS for targets in TRANSITIONS.values() for nxt in targets)

    async def skip_the_group() -> Phase:
        return Phase.SHARDED_STEP

    with pytest.raises(RuntimeError, match="'local work' cannot go to"):
        await run_phases({Phase.LOCAL_WORK: skip_the_group}, Phase.LOCAL_WORK)
    with pytest.raises(ValueError, match="cannot start at 'commit'"):
        await run_phases({}, Phase.COMMIT)
