"""The training loop of one swarm member: local work, a group per round, the sharded step, progress.

A :class:`SwarmTrainer` runs each round as the state machine of :mod:`legion_swarm.train.phases`, one handler
per phase (``_phase_<name>``), on whatever :class:`~legion_swarm.train.modes.TrainingMode` the swarm's config
names (the loop knows no mode by its class):

1. ``LOCAL_WORK``: the mode's local steps on batches of its leased data shard (one backward pass in ``sync``,
   ``inner_steps`` AdamW steps in ``diloco``; in a round by time or samples, as many as fit in the round's
   budget, at most that many); none right after a re-sync in a mode that joins idle;
2. ``GROUP``: asks the round's leader for the group (:mod:`legion_swarm.groups.matchmaking`), telling it which
   state it holds; if its state is not the leader's (new, returning, late, or declared faulty) it downloads
   the swarm's state from donors (:mod:`legion_swarm.train.state_sync`) and goes back to ``LOCAL_WORK``,
   keeping the local work it did for the next round;
3. ``HAND_OVER``: takes over the optimizer state of its new shard from the previous owners if the partition
   moved;
4. ``SHARDED_STEP``: the mode's round, then ``COMMIT``, or ``FAILED`` if the round committed nothing;
5. ``COMMIT`` / ``FAILED``: chains the state id: ``sha256(previous id, group digest, committed shards)``.
   Survivors of a round hold bit-identical state, so equal ids mean equal parameters. ``max_failed_rounds``
   failed rounds in a row stop training with a :class:`TrainingError` rather than spin;
6. ``REPORT``: publishes progress (round, step, loss, tokens/s, bytes sent and received) with its next
   heartbeat; then the next round's ``LOCAL_WORK``, or ``DONE`` after ``rounds`` committed rounds.

**Unequal peers.** In a round by time (``round_seconds``) or samples (``round_samples``), every member's local
work ends at the same moment of the round's clock (which starts when the previous round ends, or when a late
member learns it was late), whatever its speed: a fast GPU does many steps, a laptop few, each weighed by its
samples. A leader whose whole view has asked stops its own local work, so a slow leader stalls nobody. A
member that misses a round keeps its work and contributes it to the next one, and waiting for a round that is
running without it is not a failure: only rounds that commit nothing count towards ``max_failed_rounds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from legion_swarm.collectives import Collectives, RoundResult
from legion_swarm.config import CollectiveConfig, TrainConfig
from legion_swarm.dht.node import dht_time
from legion_swarm.dht.records import PeerRecord
from legion_swarm.errors import SwarmConfigError, TrainingError
from legion_swarm.groups.clustering import RttMatrix, form_groups
from legion_swarm.groups.info import GroupInfo, GroupMember
from legion_swarm.groups.layout import Layout
from legion_swarm.groups.matchmaking import Formed, Matchmaker, Resync
from legion_swarm.peer import SwarmPeer
from legion_swarm.train.checkpoint import (
    Checkpoint,
    CheckpointSchedule,
    PeriodicCheckpoints,
    assemble_optimizer_state,
)
from legion_swarm.train.compute import Compute
from legion_swarm.train.data import ShardReader, TokenData, evaluate, load_tokens, val_batches
from legion_swarm.train.device import Placement
from legion_swarm.train.leases import LeaseConfig, ShardLeases
from legion_swarm.train.metrics import sample_positions, take_sample
from legion_swarm.train.model import build_model
from legion_swarm.train.modes import RoundOutcome, TrainingMode, create_mode, trainable
from legion_swarm.train.optim import StateSlice
from legion_swarm.train.phases import Phase, PhaseHandler, run_phases
from legion_swarm.train.state_sync import StateServer, StateSource, download_state, fetch_optimizer_state
from legion_swarm.train.swarm_config import SignedSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How one member runs the loop (local choices; the swarm's shared settings are in :class:`SwarmSpec`)."""

    rounds: int | None = None
    """Stop after this many committed rounds of this peer (``None``: until cancelled)."""
    window_s: float = 2.0
    """How long a leader waits at least for the members in its view to ask for a round. It waits longer when
    rounds are long: a quarter of its own local work per round (members drift apart by a share of it)."""
    request_timeout_s: float = 30.0
    """How long a member waits for the leader's answer beyond the window."""
    view_refresh_s: float = 2.0
    """How often the member list is re-read from the DHT."""
    nice: int = 0
    """CPU priority of the model compute, 0 (normal) to 19 (only when idle); see :mod:`legion_swarm.train.compute`."""
    device: str | torch.device = "auto"
    """Where the model computes: ``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""
    precision: str = "fp32"
    """Of forward and backward passes: ``fp32``, ``bf16`` or ``fp16`` (autocast, float32 master weights)."""
    speed: float = 1.0
    """For experiments with unequal peers: throttle the compute to this fraction of its pace, in (0, 1]."""
    checkpoints: CheckpointSchedule | None = None
    """Write the swarm's state to a checkpoint every so many committed rounds (None: never)."""
    eval_every: int = 0
    """Evaluate the validation loss every this many rounds (0: only at the end)."""
    eval_batches: int = 8
    collective: CollectiveConfig | None = None
    """A local replacement of the swarm config's ``collective`` section (e.g. short deadlines in tests); the codecs
    always come from the swarm's config. ``None``: the swarm's section."""


@dataclass
class Progress:
    """What a member reports, locally and in its heartbeat."""

    round: int = 0
    step: int = 0
    loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    group_size: int = 0
    group: str | None = None
    """A short label of this peer's last group (equal for its members), e.g. ``4@3fa2c1``."""
    groups: int = 0
    """How many groups the last round had."""
    rounds_committed: int = 0
    rounds_failed: int = 0
    resyncs: int = 0
    samples: int = 0
    """Samples of local work this peer has contributed to committed rounds."""
    samples_dropped: int = 0
    """Samples of local work thrown away (a re-sync that could not keep it, a round declared faulty)."""
    samples_per_s: float | None = None
    """Of local work (compute only), smoothed over steps."""
    compute_s: float = 0.0
    """Seconds spent in local steps (forward, backward, inner optimizer) since the run started."""
    train_s: float = 0.0
    """Seconds from the run's start to the end of its last round (what ``tokens_per_s`` divides by)."""
    bandwidth: float | None = None
    """Measured data-plane throughput in MB/s, smoothed over rounds."""
    waits: list[float] = field(default_factory=list)
    """Seconds from asking for each round to its group being formed."""
    group_sizes: list[int] = field(default_factory=list)
    """Members of this peer's group in each round it took part in."""
    history: list[tuple[int, float]] = field(default_factory=list)
    """``(step, loss)`` after every round."""
    download: tuple[int, int] | None = None
    """``(bytes done, bytes total)`` while downloading the swarm's state, else None."""


class SwarmTrainer(StateSource):
    """Trains ``spec``'s model with the swarm, as member ``peer``. Build with :meth:`create`."""

    def __init__(
        self, peer: SwarmPeer, signed: SignedSpec, config: LoopConfig, data: TokenData, model: torch.nn.Module
    ) -> None:
        assert peer.plane is not None and peer.dht is not None and peer.membership is not None
        self.peer, self.signed, self.spec, self.config = peer, signed, signed.spec, config
        self.tag = f"[{peer.tag}]"
        self.data = data
        data.check_vocab(self.spec.model.vocab_size)
        self.placement = Placement.of(config.device, config.precision)
        self.model = model.to(self.placement.device)
        self.params = trainable(self.model)
        self.numel = sum(p.numel() for p in self.params)
        self._sample_at = sample_positions([p.numel() for p in self.params])
        self.collectives = Collectives(peer.plane, self.spec.collective_config(config.collective))
        self.compute = Compute(nice=config.nice, speed=config.speed)
        self.mode: TrainingMode = create_mode(
            self.spec.train.mode, self.model, self.collectives, self.spec.train, compute=self.compute,
            placement=self.placement,
        )  # fmt: skip
        self.matchmaker = Matchmaker(
            peer.host, peer.swarm, window_s=config.window_s, timeout_s=config.request_timeout_s,
            grouping=self._grouping,
        )  # fmt: skip
        self.round = 0
        self.state_id = _initial_state_id(signed)
        self.matchmaker.state = (self.round, self.state_id)
        self.owners: tuple[tuple[str, int, int], ...] = ()
        self.progress = Progress()
        self.leases: ShardLeases | None = None
        self.shard: int | None = None
        self.reader: ShardReader | None = None
        self._view: set[str] = set()
        self._settled: set[str] = set()  # the peers of the view that have committed a round since they started
        self._suspects: dict[str, float] = {}  # leaders and donors we could not reach -> when (DHT time)
        self._failed_syncs = 0  # state downloads in a row that found no donor
        self._view_at = 0.0
        self._ahead: list[str] = []
        self._catching_up = False  # set by a re-sync: the next round may be joined without local work
        self._work = _RoundWork()  # what this round's phases have done so far
        self._failed_in_a_row = 0  # rounds in a row that committed nothing
        self._tokens = 0  # tokens of local work since the run started
        self._steps_pending = 0  # local steps not yet contributed to a round (kept across a late round)
        self._clock = time.perf_counter()  # when this round's local work may start: the round clock's origin
        self._step_s: float | None = None  # smoothed seconds per local step
        self._bandwidth_ema = 0.0
        self._rates: dict[str, float] = {}  # samples/s of the view's trainers' local work, from their records
        self.phase_seconds: dict[str, float] = {}
        """Seconds spent in each round phase (by :class:`Phase` value) since the run started."""
        self._phase: Phase | None = None
        self._phase_at = 0.0
        self.checkpoints = None if config.checkpoints is None else PeriodicCheckpoints(config.checkpoints, peer.swarm)
        self.on_round: Callable[[SwarmTrainer], None] | None = None
        """Called after every round (e.g. to refresh a display); must not raise."""
        self.started_at = time.perf_counter()

    @classmethod
    async def create(cls, peer: SwarmPeer, signed: SignedSpec, config: LoopConfig) -> SwarmTrainer:
        # Off the event loop: heartbeats go on while the data loads and the model builds (seconds for medium).
        data = await asyncio.to_thread(load_tokens, signed.spec.data)
        model = await asyncio.to_thread(build_model, signed.spec.model)
        self = cls(peer, signed, config, data, model)
        await self.matchmaker.start()
        self.server = StateServer(peer.host, self)
        await self.server.start()
        assert peer.dht is not None
        # Leases renew with the heartbeat (at most every 2 s), and outlive a renewal that waits out a dead replica.
        renew = max(peer.config.membership.heartbeat_s, 2.0)
        ttl = renew + 4 * peer.config.dht.wait_timeout_s + 2.0
        lease_config = LeaseConfig(num_shards=data.num_shards, renew_s=renew, ttl_s=ttl, settle_s=1.0)
        self.leases = await ShardLeases.create(peer.dht, peer.swarm, lease_config)
        peer.membership.update(mode=self.spec.train.mode, device=self.placement.label)  # type: ignore[union-attr]
        return self

    async def aclose(self) -> None:
        if self.checkpoints is not None:
            await self.checkpoints.wait()  # a checkpoint being written is finished, never torn
        self.compute.close()
        if self.leases is not None:
            await self.leases.aclose()

    def resume(self, ckpt: Checkpoint) -> None:
        """Start from a checkpoint: its parameters, round and state id (and optimizer state, if it has it)."""
        if ckpt.spec.digest() != self.spec.digest():
            raise SwarmConfigError("the checkpoint was made with another swarm config than this swarm's")
        self.mode.load_state(ckpt.flat)
        self._steps_pending = 0
        self.round, self.state_id = ckpt.round, ckpt.state_id
        if ckpt.optimizer is not None:
            self.mode.optimizer.rebase(0, self.numel, [ckpt.optimizer])
            self.owners = ((self.peer.peer_id, 0, self.numel),)
        self.matchmaker.state = (self.round, self.state_id)
        logger.info("%s resumed from a checkpoint of round %d", self.tag, self.round)

    # ------------------------------------------------------------------------------------ state source

    def describe(self) -> tuple[int, bytes, tuple[tuple[str, int, int], ...]]:
        return self.round, self.state_id, self.owners

    def flat_copy(self) -> np.ndarray:
        return torch.cat([t.detach().reshape(-1) for t in self.mode.state_tensors()]).numpy()

    def optim_range(self, start: int, end: int) -> StateSlice | None:
        return self.mode.optimizer.export(start, end)

    async def _snapshot(self) -> Checkpoint:
        """The state this member holds now (copied), with the whole space's optimizer state if every owner
        hands its range over (this member's own range from itself), else the parameters alone."""
        flat = torch.from_numpy(self.flat_copy())
        optimizer = self.mode.optimizer
        found: dict[tuple[int, int], StateSlice] = {}
        own = optimizer.export(optimizer.start, optimizer.end) if optimizer.end > optimizer.start else None
        if own is not None:
            found[(optimizer.start, optimizer.end)] = own
        others = tuple(o for o in self.owners if o[0] != self.peer.peer_id)
        found.update(
            await fetch_optimizer_state(
                self.peer.host, others, self.state_id, 0, self.numel, buffer_names=optimizer.buffer_names
            )
        )
        whole = assemble_optimizer_state(found, self.numel, optimizer.buffer_names)
        return Checkpoint(self.spec, self.round, self.state_id, flat, whole)

    # ------------------------------------------------------------------------------------------- loop

    async def run(self) -> Progress:
        """Train until ``config.rounds`` rounds committed (or forever); returns the progress."""
        await self._initial_sync()
        self._failed_in_a_row = self._tokens = 0
        self.started_at = self._clock = time.perf_counter()
        handlers: dict[Phase, PhaseHandler] = {
            Phase.LOCAL_WORK: self._phase_local_work,
            Phase.GROUP: self._phase_group,
            Phase.HAND_OVER: self._phase_hand_over,
            Phase.SHARDED_STEP: self._phase_sharded_step,
            Phase.COMMIT: self._phase_commit,
            Phase.FAILED: self._phase_failed,
            Phase.REPORT: self._phase_report,
        }
        await run_phases(handlers, self._after_report(), on_enter=self._time_phase)
        self.progress.val_loss = await self.evaluate()
        return self.progress

    def _time_phase(self, phase: Phase) -> None:
        """``phase_seconds``: the time since the previous phase began goes to that phase."""
        now = time.perf_counter()
        if self._phase is not None:
            name = self._phase.value
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + now - self._phase_at
        self._phase, self._phase_at = phase, now

    def _after_report(self) -> Phase:
        if self.config.rounds is None or self.progress.rounds_committed < self.config.rounds:
            return Phase.LOCAL_WORK
        return Phase.DONE

    async def _phase_local_work(self) -> Phase:
        idle = self._catching_up and self.mode.join_idle_after_resync and not self._steps_pending
        work = self._work = _RoundWork(idle=idle)
        self._catching_up = False
        if not work.idle:
            work.loss, n_tokens = await self._local_work()
            self._tokens += n_tokens
        # else: just downloaded the swarm's state: ask for the next round at once with nothing to add (zero
        # weight), instead of arriving a whole local work late for it and re-syncing again.
        return Phase.GROUP

    async def _phase_group(self) -> Phase:
        asked = time.perf_counter()
        formed = await self._form_group(idle=self._work.idle)
        if formed is None:  # re-synced: the local work (kept, if it could be) goes into the next round
            return Phase.LOCAL_WORK
        self._work.formed = formed
        self.progress.waits.append(time.perf_counter() - asked)
        return Phase.HAND_OVER

    async def _phase_hand_over(self) -> Phase:
        work = self._work
        assert work.formed is not None
        lo, hi = self.mode.my_range(work.formed.layout)
        work.handed = []
        if (lo, hi) != (self.mode.optimizer.start, self.mode.optimizer.end) and self.owners:
            found = await fetch_optimizer_state(
                self.peer.host, self.owners, self.state_id, lo, hi, buffer_names=self.mode.optimizer.buffer_names
            )
            work.handed = list(found.values())
        return Phase.SHARDED_STEP

    async def _phase_sharded_step(self) -> Phase:
        work = self._work
        assert work.formed is not None
        work.outcome = await self.mode.round(work.formed.layout, handed=work.handed)
        self._steps_pending = 0
        self._clock = time.perf_counter()  # the next round's local work starts now, on every member
        return Phase.COMMIT if work.outcome.result.committed else Phase.FAILED

    async def _phase_commit(self) -> Phase:
        self._adopt()
        self._failed_in_a_row = 0
        if self.checkpoints is not None and self.checkpoints.due(self.round) and self._work.outcome.in_sync:
            await self.checkpoints.write(await self._snapshot())
        return Phase.REPORT

    async def _phase_failed(self) -> Phase:
        self._adopt()
        self._failed_in_a_row += 1
        self._check_failures(self._failed_in_a_row)
        return Phase.REPORT

    async def _phase_report(self) -> Phase:
        assert self._work.outcome is not None
        elapsed = self.progress.train_s = time.perf_counter() - self.started_at
        self._report(self._work.outcome.result, self._work.loss, self._tokens / max(elapsed, 1e-9))
        if self.config.eval_every and self.progress.rounds_committed % self.config.eval_every == 0:
            self.progress.val_loss = await self.evaluate()
        if self.on_round is not None:
            self.on_round(self)
        return self._after_report()

    async def _form_group(self, *, idle: bool = False) -> Formed | None:
        """The group of our next round; None if we had to re-sync instead. Retries with backoff while the
        leader is unreachable or not there yet; raises after ``max_failed_rounds`` attempts in a row."""
        me = GroupMember(
            peer_id=self.peer.peer_id, direct=self.peer.plane.endpoint,  # type: ignore[union-attr]
            maddrs=tuple(self.peer.maddrs), bandwidth=self.progress.bandwidth or 1.0,
        )  # fmt: skip
        attempt = busy = 0
        busy_until = time.perf_counter() + self.collectives.config.round_timeout_s + self.config.request_timeout_s
        while attempt < self.spec.train.max_failed_rounds:
            view = await self.view()
            if self._ahead:
                await self._resync(self._ahead)
                return None
            settled = self._settled | ({me.peer_id} if self.progress.rounds_committed else set())
            decision = await self.matchmaker.form(me, view, idle=idle, settled=settled)
            if isinstance(decision, Formed):
                return decision
            if isinstance(decision, Resync):
                await self._resync(list(decision.donors))
                return None
            if decision.busy and time.perf_counter() < busy_until:
                # Late: the round runs without us. Not a failure; its result comes as a re-sync answer.
                busy += 1
                await asyncio.sleep(min(0.1 * 2**busy, 1.0))
                continue
            attempt += 1
            logger.info("%s round %d: %s", self.tag, self.round + 1, decision.reason)
            self.progress.rounds_failed += 1
            if decision.unreachable is not None:
                # Likely dead: its record lives on for a TTL, but the next leader should take over now.
                self._suspects[decision.unreachable] = dht_time()
            self._view_at = 0.0  # the leader may be gone: look again
            await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        raise TrainingError(f"no group formed for round {self.round + 1} after {attempt} attempts")

    def _check_failures(self, failed_in_a_row: int) -> None:
        self.progress.rounds_failed += 1
        if failed_in_a_row >= self.spec.train.max_failed_rounds:
            raise TrainingError(f"{failed_in_a_row} rounds in a row failed; giving up")

    async def _local_work(self) -> tuple[float | None, int]:
        """Local passes over this peer's data; returns the mean loss (None if it took no step) and the tokens
        processed."""
        started = time.perf_counter()
        try:
            return await self._local_steps()
        finally:
            # A member that misses the leader's window is late for the round (its work waits for the next one),
            # so the window grows with the work: in diloco, 20 steps on a busy machine drift apart by seconds.
            took = time.perf_counter() - self._clock if self.spec.train.budgeted else time.perf_counter() - started
            self.matchmaker.window_s = max(self.config.window_s, took / 4)

    async def _local_steps(self) -> tuple[float | None, int]:
        """Up to the mode's ``local_steps`` since the last contribution; in a round by time or samples, fewer if
        the round's budget ends first (or, as the leader, when everyone in its view has asked).

        The steps run back to back in one call on the compute thread, not one call each: on CPU, torch's
        intra-op threads lose about a quarter of their speed when every step is handed to the thread
        separately. The event loop meanwhile serves the swarm and, as the leader, tells the loop to stop when
        everyone in its view has asked; the data lease is only re-acquired between such calls."""
        deadline = self._deadline()
        cut = threading.Event()  # set on the event loop: everyone in our view has asked us for the round
        watcher = asyncio.create_task(self._watch_asks(cut)) if deadline is not None else None
        losses: list[float] = []
        try:
            while self._steps_pending < self.mode.local_steps:
                await self._ensure_shard()
                more = await self.compute.run(
                    self._step_loop, deadline, cut, asyncio.get_running_loop(), losses, throttled=False
                )
                if not more:
                    break
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        assert self.spec.model.seq_len is not None
        tokens = len(losses) * self.spec.data.batch_size * self.spec.model.seq_len
        return (float(np.mean(losses)) if losses else None), tokens

    def _step_loop(
        self, deadline: float | None, cut: threading.Event, loop: asyncio.AbstractEventLoop, losses: list[float]
    ) -> bool:
        """On the compute thread: local steps until the round's steps or budget are done (False) or the data
        lease is lost (True: acquire another shard and go on). Lease positions go to the event loop."""
        leases, reader, shard = self.leases, self.reader, self.shard
        assert leases is not None and reader is not None and shard is not None
        while self._steps_pending < self.mode.local_steps:
            if deadline is not None and self._budget_spent(deadline, cut):
                return False
            if not leases.still_holds(shard):
                return True
            batch = next(reader)
            loop.call_soon_threadsafe(leases.update_position, shard, reader.position)
            started = time.perf_counter()
            losses.append(self.mode.compute_step(batch))
            self.compute.pause(time.perf_counter() - started)  # the throttle of experiments with unequal peers
            took = time.perf_counter() - started
            self.progress.compute_s += took
            self._step_s = took if self._step_s is None else 0.8 * self._step_s + 0.2 * took
            self.progress.samples_per_s = self.spec.data.batch_size / max(self._step_s, 1e-9)
            self.progress.step += 1
            self._steps_pending += 1
            if deadline is None and self.spec.train.round_samples is not None:
                deadline = self._deadline()  # by samples: known once this member has a rate (its first step)
        return False

    async def _watch_asks(self, cut: threading.Event) -> None:
        """As the round's leader: ``cut`` once everyone in our view has asked for the next round."""
        while not cut.is_set():
            if self._view and self._view <= self.matchmaker.asked(self.round + 1):
                cut.set()
                return
            await asyncio.sleep(0.05)

    def _deadline(self) -> float | None:
        """When this round's local work ends on the round clock (``perf_counter``), or None for a round by steps
        (or by samples before this member's first step). A member of the view whose rate is not published yet
        counts at this member's rate. Safe on the compute thread: it only reads what the event loop replaces."""
        rates = dict(self._rates)
        own = self.progress.samples_per_s
        if own is not None:
            rates[self.peer.peer_id] = own
            for peer_id in self._view:
                rates.setdefault(peer_id, own)
        budget = round_budget_s(self.spec.train, rates.values())
        return None if budget is None else self._clock + budget

    def _budget_spent(self, deadline: float, cut: threading.Event) -> bool:
        """Stop stepping: the next step would end past the deadline by more than half of it (so on average the
        work ends on time), or we lead the round and everyone in our view has asked for it (``cut``). A member
        with no work at all takes one step."""
        if self._steps_pending == 0 and self.mode.samples == 0:
            return False
        return cut.is_set() or time.perf_counter() + (self._step_s or 0.0) / 2 >= deadline

    async def _ensure_shard(self) -> None:
        """A data shard leased and its reader at the shard's position (acquired again if the lease was lost)."""
        leases = self.leases
        assert leases is not None
        if self.shard is None or not leases.still_holds(self.shard):
            self.shard = await leases.acquire()
            if self.shard is None:
                raise TrainingError("no data shard is free: the swarm has more peers than data shards")
            tokens = await asyncio.to_thread(self.data.shard, self.shard)  # a Hub source streams it in
            self.reader = ShardReader(
                tokens, self.spec.model.seq_len, self.spec.data.batch_size,
                seed=self.spec.data.seed + self.shard, position=leases.position(self.shard),
            )  # fmt: skip
            logger.info("%s reading data shard %d from batch %d", self.tag, self.shard, self.reader.position)

    async def view(self) -> set[str]:
        """Peer ids of the live trainers that are in step (published a round); notes peers ahead of us."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._view_at >= self.config.view_refresh_s:
            members = (await self.peer.view()).members
            trainers = [m.record for m in members if isinstance(m.record, PeerRecord) and m.record.mode is not None]
            # A suspect is back in the view once it has sent a heartbeat since we suspected it.
            self._suspects = {p: t for p, t in self._suspects.items() if any(r.peer_id == p for r in trainers)}
            trainers = [r for r in trainers if r.sent_at > self._suspects.get(r.peer_id, float("-inf"))]
            self._view = {r.peer_id for r in trainers if r.round is not None and r.peer_id != self.peer.peer_id}
            self._rates = {r.peer_id: r.samples_per_s for r in trainers if r.peer_id in self._view and r.samples_per_s}
            self._settled = {r.peer_id for r in trainers if r.peer_id in self._view and r.committed}
            self._ahead = [r.peer_id for r in trainers if r.round is not None and r.round > self.round]
            self._view_at = loop.time()
        return self._view

    async def _initial_sync(self) -> None:
        """Catch up with a swarm that is already training; otherwise start from the config's initial state. Our
        record is published at once (not at the next heartbeat) and we look again after a leader's window, so
        peers that start together find each other before their first round."""
        membership = self.peer.membership
        assert membership is not None
        looks = 0
        while looks < 2:
            await self.view()
            if self._ahead:
                if await self._resync(self._ahead):
                    self._publish_progress()
                    await membership.publish()
                    return  # the swarm is running: its next round is ours
                continue  # the donors were gone (their records outlive them for a TTL): look again
            self._publish_progress()
            await membership.publish()
            looks += 1
            await asyncio.sleep(self.config.window_s)
            self._view_at = 0.0

    async def _resync(self, donors: list[str]) -> bool:
        """Download the swarm's state from ``donors``. False if none of them could serve it (they left or died
        after the view was read): the view is read again after a pause. Raises after ``max_failed_rounds`` such
        failures in a row."""
        donors = [d for d in donors if d != self.peer.peer_id]
        if not donors:
            raise TrainingError("told to re-sync, but no donor was named")
        told_at = time.perf_counter()  # about when the swarm's next round started (we were told at its end)

        def progress(done: int, total: int) -> None:
            self.progress.download = (done, total)

        try:
            got = await download_state(self.peer.host, donors, numel=self.numel, progress=progress)
        except TrainingError as e:
            self._failed_syncs += 1
            if self._failed_syncs >= self.spec.train.max_failed_rounds:
                raise
            logger.warning("%s could not re-sync (%s); looking at the swarm again", self.tag, e)
            self._suspects.update(dict.fromkeys(donors, dht_time()))
            self._ahead = []
            self._view_at = 0.0
            await asyncio.sleep(min(0.5 * 2**self._failed_syncs, 4.0))
            return False
        finally:
            self.progress.download = None
        self._failed_syncs = 0
        # Work done since our last round goes into the swarm's next one, unless the swarm has moved on by more
        # than max_staleness rounds since (then it is too stale to help).
        keep = self._steps_pending > 0 and got.meta.round - self.round <= self.spec.train.max_staleness
        if not keep:
            self.progress.samples_dropped += self.mode.samples
            self._steps_pending = 0
        self.mode.load_state(got.flat, keep_work=keep)
        self._clock = told_at
        self.round, self.state_id, self.owners = got.meta.round, got.meta.state_id, got.meta.owners
        self.matchmaker.state = (self.round, self.state_id)
        self.matchmaker.donors = got.donors
        self._ahead = []
        self._view_at = 0.0
        self.progress.resyncs += 1
        self._catching_up = True
        logger.info("%s now at round %d (downloaded from %d donors%s)", self.tag, self.round, len(got.donors),
                    f"; keeping {self.mode.samples} samples of local work" if keep else "")  # fmt: skip
        return True

    async def _grouping(self, peer_ids: list[str]) -> list[list[str]]:
        """As the round's leader: one group, or latency-based groups from the swarm's RTT records when the round
        has more than ``max_group`` members."""
        train = self.spec.train
        if not train.max_group or len(peer_ids) <= train.max_group:
            return [peer_ids]
        measured = await self.peer.rtts()
        matrix = RttMatrix.from_measurements(measured, peer_ids)
        groups = form_groups(peer_ids, matrix, min_group=train.min_group, max_group=train.max_group)
        return [list(g) for g in groups]

    def _adopt(self) -> None:
        """Take the round's outcome as this member's state (committed or not: every survivor agrees on it)."""
        formed, outcome = self._work.formed, self._work.outcome
        assert formed is not None and outcome is not None
        layout, group, result = formed.layout, formed.group, outcome.result
        self.round = formed.round
        self.state_id = self._next_state_id(layout)
        faulty = {group.members[i].peer_id for i in result.faulty}
        self.owners = tuple(r for r in layout.ranges(self.mode.numels) if r[0] not in faulty)
        self.matchmaker.state = (self.round, self.state_id)  # at once: a faster member may already ask us
        self.matchmaker.donors = tuple(m.peer_id for g in layout.groups for m in g if m.peer_id not in faulty)
        if not outcome.in_sync:
            logger.warning("%s declared faulty in round %d: re-syncing", self.tag, self.round)
            self._ahead = [d for d in self.matchmaker.donors if d != self.peer.peer_id]
        self.progress.bytes_sent += outcome.bytes_sent
        self.progress.bytes_received += outcome.bytes_received
        if result.committed:
            self.progress.samples += outcome.samples
        self._measure_bandwidth(result)
        self.progress.group_size = group.size
        self.progress.group_sizes.append(group.size)
        self.progress.groups = len(layout.groups)
        self.progress.group = _group_label(group)

    def _measure_bandwidth(self, result: RoundResult) -> None:
        """This peer's throughput in MB/s from the round's bytes and transfer time (the owner's arithmetic left
        out), smoothed, and rounded to a power of 2**0.5 so that the partition, sized by it, does not move (and
        hand optimizer state over) every round for noise."""
        t = result.timings
        if "all_gather" not in t or "reduce_scatter" not in t or result.bytes_sent < 1 << 16:
            return
        transfer = t["all_gather"] - (t.get("update", t["reduce_scatter"]) - t["reduce_scatter"])
        rate = result.bytes_sent / max(transfer, 1e-3) / 1e6
        old = self.progress.bandwidth
        self._bandwidth_ema = rate if old is None else 0.7 * self._bandwidth_ema + 0.3 * rate
        self.progress.bandwidth = bandwidth_level(self._bandwidth_ema)

    def _next_state_id(self, layout: Layout) -> bytes:
        """The id of the state after a round: a hash of the previous id, the round's layout and the state's bytes.
        Members hold equal ids exactly when they hold bit-identical state, whatever group they were in."""
        h = hashlib.sha256(self.state_id + layout.digest)
        for t in self.mode.state_tensors():
            h.update(t.detach().contiguous().numpy().data)
        return h.digest()[:16]

    def _report(self, result: RoundResult, loss: float | None, tokens_per_s: float) -> None:
        """``loss``: of this round's local work (None if it did none: it had just caught up)."""
        p = self.progress
        p.round, p.tokens_per_s = self.round, tokens_per_s
        if result.committed:
            p.rounds_committed += 1
        if loss is not None:
            p.loss = loss
            p.history.append((p.step, loss))
        logger.info(
            "%s round %d: loss %s, group %d, committed %d/%d shards, %.0f tokens/s", self.tag, self.round,
            "-" if loss is None else f"{loss:.4f}", result.group.size, len(result.committed), result.group.size,
            tokens_per_s,
        )  # fmt: skip
        self._publish_progress()

    def _publish_progress(self) -> None:
        p = self.progress
        self.peer.membership.update(  # type: ignore[union-attr]
            round=self.round, step=p.step, loss=p.loss, tokens_per_s=p.tokens_per_s, bytes_sent=p.bytes_sent,
            bytes_received=p.bytes_received, mode=self.spec.train.mode, group=p.group,
            state_id=self.state_id.hex()[:16], committed=p.rounds_committed, failed=p.rounds_failed,
            sample=take_sample(self.mode.state_tensors(), self._sample_at), samples_per_s=p.samples_per_s,
            bandwidth=p.bandwidth,
        )  # fmt: skip

    async def evaluate(self) -> float:
        """Mean loss of the current (group) state on the held-out validation split."""
        batches = val_batches(
            self.data.val, self.spec.model.seq_len, self.spec.data.batch_size, self.config.eval_batches
        )
        return await self.compute.run(evaluate, self.model, batches)


@dataclass
class _RoundWork:
    """What the phases of the current round have done so far (a fresh one at every ``LOCAL_WORK``)."""

    idle: bool = False
    """Joined without local work: it had just re-synced."""
    loss: float | None = None
    """Mean loss of the local work (None if it did none)."""
    formed: Formed | None = None
    """The group of the round, once ``GROUP`` formed it."""
    handed: list[StateSlice] = field(default_factory=list)
    """Optimizer state of this member's new shard, from its previous owners (``HAND_OVER``)."""
    outcome: RoundOutcome | None = None
    """What the ``SHARDED_STEP`` did."""


def bandwidth_level(mb_per_s: float) -> float:
    """A measured throughput rounded to the nearest power of 2**0.5 (1, 1.41, 2, 2.83, ... MB/s): what a member
    announces, so that the partition sized by it moves only when the throughput changes by ~40 %."""
    return float(2 ** (round(2 * math.log2(max(mb_per_s, 1e-3))) / 2))


def round_budget_s(train: TrainConfig, rates: Iterable[float]) -> float | None:
    """Seconds of local work per round: ``round_seconds``, or ``round_samples`` over the swarm's summed compute
    rates (samples/s of the members in view, this one included), whichever is shorter; None in a round by
    steps, or by samples while no rate is known (then ``inner_steps`` steps)."""
    budgets = [] if train.round_seconds is None else [train.round_seconds]
    total = sum(r for r in rates if r > 0)
    if train.round_samples is not None and total > 0:
        budgets.append(train.round_samples / total)
    return min(budgets) if budgets else None


def _initial_state_id(signed: SignedSpec) -> bytes:
    """Every member starts from the parameters the config's seed gives: one state id for all of them."""
    return hashlib.sha256(b"init" + signed.digest).digest()[:16]


def _group_label(group: GroupInfo) -> str:
    """``<size>@<6 hex digits>``: equal for the members of one group, whatever the round."""
    ids = sorted(m.peer_id for m in group.members)
    return f"{group.size}@{hashlib.sha256(msgpack.packb(ids)).hexdigest()[:6]}"
