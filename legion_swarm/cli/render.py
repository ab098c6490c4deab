"""How the CLI shows a swarm: a rich table with a summary line, or one JSON object."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from legion_swarm.peer import Member, SwarmView
from legion_swarm.transport.identity import short_peer_id

_DASH = "—"


def _fmt(value: float | int | None, spec: str) -> str:
    return _DASH if value is None else format(value, spec)


def _age(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _hardware(member: Member) -> str:
    hw = member.record.hardware
    text = f"{hw.cpus} CPU · {hw.ram_gb:.0f} GiB"
    return f"{text} · {hw.gpu}" if hw.gpu else text


def _bytes(n: int | None) -> str:
    if n is None:
        return _DASH
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _addr(member: Member) -> str:
    addrs = [a.split("/p2p/")[0] for a in member.record.addrs]
    if not addrs:
        return _DASH
    return addrs[0] if len(addrs) == 1 else f"{addrs[0]} (+{len(addrs) - 1})"


def summary(view: SwarmView) -> dict[str, Any]:
    records = [m.record for m in view.members]
    return {
        "peers": len(records),
        "cpus": sum(r.hardware.cpus for r in records),
        "gpus": sum(1 for r in records if r.hardware.gpu),
        "ram_gb": round(sum(r.hardware.ram_gb for r in records), 1),
    }


def status_table(view: SwarmView) -> Table:
    totals = summary(view)
    rounds = [m.record.round for m in view.members if m.record.round is not None]
    training = f" · round {max(rounds)}" if rounds else ""
    table = Table(
        title=f"swarm [bold]{view.swarm}[/bold]",
        caption=(
            f"{totals['peers']} peers alive · {totals['cpus']} CPUs · {totals['gpus']} GPUs · "
            f"{totals['ram_gb']:.0f} GiB RAM{training} · read in {view.read_s * 1000:.0f} ms"
        ),
        header_style="bold",
    )
    table.add_column("peer", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("role", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("hardware", no_wrap=True)
    table.add_column("seen", justify="right")
    table.add_column("mode", no_wrap=True)
    table.add_column("round", justify="right")
    table.add_column("step", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("tok/s", justify="right")
    table.add_column("sent / recv", justify="right", no_wrap=True)
    table.add_column("group", no_wrap=True)
    for member in view.members:
        r = member.record
        table.add_row(
            short_peer_id(r.peer_id),
            _addr(member),
            r.role,
            r.version,
            _hardware(member),
            _age(member.last_seen_s),
            r.mode or _DASH,
            _fmt(r.round, "d"),
            _fmt(r.step, "d"),
            _fmt(r.loss, ".3f"),
            _fmt(r.tokens_per_s, ",.0f"),
            _DASH if r.bytes_sent is None else f"{_bytes(r.bytes_sent)} / {_bytes(r.bytes_received)}",
            r.group or _DASH,
        )
    return table


def view_to_json(view: SwarmView) -> dict[str, Any]:
    peers = []
    for member in view.members:
        r = member.record
        peers.append(
            {
                "peer_id": r.peer_id,
                "addrs": list(r.addrs),
                "role": r.role,
                "version": r.version,
                "hardware": {"cpus": r.hardware.cpus, "ram_gb": r.hardware.ram_gb, "gpu": r.hardware.gpu},
                "started_at": r.started_at,
                "last_seen_s": round(member.last_seen_s, 3),
                "expires_in_s": round(member.expires_at - view.read_at, 3),
                "step": r.step,
                "loss": r.loss,
                "tokens_per_s": r.tokens_per_s,
                "group": r.group,
                "mode": r.mode,
                "round": r.round,
                "bytes_sent": r.bytes_sent,
                "bytes_received": r.bytes_received,
                "data": list(r.data) if r.data is not None else None,
            }
        )
    return {
        "swarm": view.swarm,
        "read_at": view.read_at,
        "read_s": round(view.read_s, 4),
        "summary": summary(view),
        "peers": peers,
    }
