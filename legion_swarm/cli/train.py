"""Training from the command line: the swarm config flags, the creator's publisher, the joiner's trainer and
its live display."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from typing import Any

from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from legion_swarm.config import SPEC_SECTIONS, add_config_flags, config_overrides, flags_argv
from legion_swarm.errors import SwarmConfigError

logger = logging.getLogger(__name__)


def add_spec_flags(p: argparse.ArgumentParser, *, creator: bool) -> None:
    """The swarm config's flags, one per field of its sections (generated: :mod:`legion_swarm.config.flags`). A
    creator's flags set the swarm's config; a joiner's must equal it (:func:`check_overrides`)."""
    if creator:
        p.add_argument(
            "--config", metavar="FILE",
            help="swarm config: a TOML file with [model], [data], [train], [collective] tables, or a checkpoint "
            "(.safetensors); the flags below override its values",
        )  # fmt: skip
    note = "the swarm's config" if creator else "each given flag must equal the swarm's config"
    for section, cls in SPEC_SECTIONS.items():
        add_config_flags(p, cls, section, note=note)


def overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The swarm config flags given on the command line: ``{"train": {"codec": "int8"}, ...}``."""
    return config_overrides(args, SPEC_SECTIONS)


def spec_argv(args: argparse.Namespace) -> list[str]:
    """The swarm config flags given on the command line, as a command line again (for ``simulate``'s bootstrap)."""
    return flags_argv(overrides(args), SPEC_SECTIONS)


def pin_data(spec: Any) -> Any:
    """The creator pins the fingerprint of the built-in corpus (it depends on the Python version), so a peer
    whose corpus differs refuses to train instead of training on other data."""
    import dataclasses

    from legion_swarm.train.corpus import corpus_fingerprint

    if spec.data.source != "builtin" or spec.data.tokenizer != "bytes" or spec.data.fingerprint is not None:
        return spec
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, fingerprint=corpus_fingerprint()))


def spec_from_args(args: argparse.Namespace) -> Any:
    """The creator's spec: its config file (if any) with the flags on top."""
    from legion_swarm.train.swarm_config import SwarmSpec

    path = getattr(args, "config", None)
    if path is not None and (str(path).endswith(".safetensors") or os.path.isdir(path)):
        from legion_swarm.train.checkpoint import load_checkpoint, resolve_checkpoint

        base = load_checkpoint(resolve_checkpoint(path)).spec  # a swarm from a checkpoint's config
    else:
        base = SwarmSpec.load(path) if path else SwarmSpec()
    merged = base.to_dict()
    changes = overrides(args)
    if "preset" in changes.get("model", {}):  # a new preset brings its own sizes
        merged["model"] = {
            k: v for k, v in merged["model"].items() if k not in ("n_layer", "n_head", "d_model", "seq_len")
        }
    for section, values in changes.items():
        merged.setdefault(section, {}).update(values)
    return SwarmSpec.from_dict(merged)


def progress_view(trainer: Any) -> Any:
    """The live display: the progress table, with a bar while the swarm's state downloads."""
    table = progress_table(trainer)
    if trainer.progress.download is None:
        return table
    done, total = trainer.progress.download
    bar = ProgressBar(total=max(total, 1), completed=done, width=40)
    return Group(table, Columns([f"state sync {done / 1e6:.1f} / {total / 1e6:.1f} MB", bar]))


def progress_table(trainer: Any) -> Table:
    p = trainer.progress
    elapsed = max(time.perf_counter() - trainer.started_at, 1e-9)
    table = Table(title=f"legion-swarm · {trainer.peer.swarm} · {trainer.spec.train.mode}", show_header=True)
    for column in ("round", "step", "loss", "val loss", "tokens/s", "group", "sent", "recv", "resyncs"):
        table.add_column(column, justify="right")
    table.add_row(
        str(p.round), str(p.step), "—" if p.loss is None else f"{p.loss:.4f}",
        "—" if p.val_loss is None else f"{p.val_loss:.4f}", "—" if p.tokens_per_s is None else f"{p.tokens_per_s:,.0f}",
        f"{p.group_size} peers" + (f" ({p.groups} groups)" if p.groups > 1 else ""),
        f"{p.bytes_sent / 1e6:.1f} MB ({p.bytes_sent / elapsed / 1e6:.2f} MB/s)", f"{p.bytes_received / 1e6:.1f} MB",
        str(p.resyncs),
    )  # fmt: skip
    return table


def summary_json(trainer: Any, seconds: float) -> str:
    p = trainer.progress
    return json.dumps({
        "event": "trained", "peer_id": trainer.peer.peer_id, "mode": trainer.spec.train.mode,
        "rounds": p.round, "rounds_committed": p.rounds_committed, "rounds_failed": p.rounds_failed,
        "steps": p.step, "first_loss": p.history[0][1] if p.history else None, "loss": p.loss,
        "val_loss": p.val_loss, "tokens_per_s": p.tokens_per_s, "bytes_sent": p.bytes_sent,
        "bytes_received": p.bytes_received, "resyncs": p.resyncs, "seconds": round(seconds, 2),
        "device": trainer.placement.label, "samples": p.samples, "samples_dropped": p.samples_dropped,
        "samples_per_s": p.samples_per_s, "compute_s": round(p.compute_s, 3),
        "train_s": round(p.train_s, 3), "bandwidth_mb_s": p.bandwidth,
        "waits": [round(w, 3) for w in p.waits], "group_sizes": p.group_sizes,
        "numel": trainer.numel, "history": [[step, round(loss, 5)] for step, loss in p.history],
    })  # fmt: skip


async def train(peer: Any, args: argparse.Namespace, console: Console, keeper: Any, metrics: Any = None) -> Any:
    """Fetch the swarm's config, check local flags against it, and train until ``--rounds`` or cancelled;
    ``keeper`` (the peer's :class:`SwarmConfigKeeper`) serves the config from then on."""
    from legion_swarm.train.loop import LoopConfig, SwarmTrainer
    from legion_swarm.train.swarm_config import check_overrides

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    signed = await keeper.fetch()
    check_overrides(signed.spec, overrides(args))
    keeper.hold(signed)  # joiners through us trust this config
    from legion_swarm.train.checkpoint import CheckpointSchedule, resolve_checkpoint

    schedule = None
    if args.checkpoint_dir:
        schedule = CheckpointSchedule(args.checkpoint_dir, every=args.checkpoint_every, keep=args.checkpoint_keep)
    config = LoopConfig(
        rounds=args.rounds, nice=args.nice, device=args.device, precision=args.precision, speed=args.speed,
        checkpoints=schedule,
    )  # fmt: skip
    trainer = await SwarmTrainer.create(peer, signed, config)
    if metrics is not None:
        metrics.trainer = trainer
    if args.resume:
        from legion_swarm.train.checkpoint import load_checkpoint

        trainer.resume(await asyncio.to_thread(load_checkpoint, resolve_checkpoint(args.resume)))
    live = console.is_terminal and not args.quiet
    try:
        if live:
            with Live(console=console, refresh_per_second=4, get_renderable=lambda: progress_view(trainer)):
                await trainer.run()
        else:
            await trainer.run()
        print(summary_json(trainer, time.perf_counter() - trainer.started_at), flush=True)
        return trainer.progress
    finally:
        await trainer.aclose()


async def export(peer: Any, out: str, console: Console) -> dict[str, Any]:
    """``checkpoint export``: assemble the swarm's current model through ``peer`` (an observer) into ``out``."""
    from legion_swarm.train.checkpoint import export_checkpoint, save_checkpoint, trainers_of
    from legion_swarm.train.swarm_config import SwarmConfigKeeper

    signed = await SwarmConfigKeeper(peer).fetch()
    trainers = await trainers_of(peer)
    if not trainers:
        raise SwarmConfigError(f"swarm {peer.swarm!r} has no training member to export from")
    with console.status(f"downloading the model from {len(trainers)} members…"):
        ckpt = await export_checkpoint(peer.host, trainers, signed.spec)
    await asyncio.to_thread(save_checkpoint, out, ckpt, peer.swarm)
    return {
        "path": out, "round": ckpt.round, "parameters": ckpt.flat.numel(), "optimizer": ckpt.optimizer is not None,
        "config": signed.digest.hex(),
    }  # fmt: skip
