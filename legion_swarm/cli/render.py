"""How the CLI shows a swarm: a rich table with a summary line (plus a table of its groups), or one JSON object.

RTTs come from the swarm's RTT records (``Rtts``: prober peer id -> {measured peer id -> median RTT in ms}, as
:meth:`~legion_swarm.peer.SwarmPeer.rtts` returns them); every function here is pure.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table

from legion_swarm.groups.clustering import intra_group_rtt
from legion_swarm.groups.probe import rtt_matrix
from legion_swarm.peer import Member, SwarmView
from legion_swarm.train.metrics import swarm_spread
from legion_swarm.transport.identity import short_peer_id

_DASH = "—"
Rtts = Mapping[str, Mapping[str, float]]


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


def _ms(value: float | None) -> str:
    if value is None:
        return _DASH
    return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def rtt_summary(measured: Mapping[str, float] | None) -> tuple[float, int] | None:
    """(median of a peer's published RTT medians in ms, how many peers it measured), None if it published none."""
    if not measured:
        return None
    return statistics.median(measured.values()), len(measured)


def _rtt_cell(measured: Mapping[str, float] | None) -> str:
    found = rtt_summary(measured)
    return _DASH if found is None else f"{_ms(found[0])} ({found[1]})"


def group_summaries(view: SwarmView, rtts: Rtts) -> tuple[list[dict[str, Any]], list[str]]:
    """The members grouped by their record's ``group`` field, and the peer ids of those with none.

    Each group: ``group`` (its name), ``members`` (sorted peer ids), ``median_rtt_ms`` (median over its member
    pairs, measured or estimated from the RTT records as the clustering does; None if no pair of it was measured;
    0.0 for a one-peer group), ``pairs`` and ``measured_pairs``. Groups are sorted by name.
    """
    by_group: dict[str, list[str]] = {}
    ungrouped = []
    for member in view.members:
        r = member.record
        if r.group:
            by_group.setdefault(r.group, []).append(r.peer_id)
        else:
            ungrouped.append(r.peer_id)
    if not by_group:
        return [], sorted(ungrouped)
    names = sorted(by_group)
    groups = [sorted(by_group[name]) for name in names]
    matrix = rtt_matrix(rtts, [m.record.peer_id for m in view.members])
    medians = intra_group_rtt(groups, matrix)
    index = {p: i for i, p in enumerate(matrix.peers)}
    result = []
    for g, (name, members) in enumerate(zip(names, groups, strict=True)):
        idx = [index[p] for p in members]
        pairs = len(idx) * (len(idx) - 1) // 2
        measured = sum(bool(matrix.measured[i, j]) for k, i in enumerate(idx) for j in idx[k + 1 :])
        median = medians[g] if measured or not pairs else None
        result.append(
            {"group": name, "members": members, "median_rtt_ms": median, "pairs": pairs, "measured_pairs": measured}
        )
    return result, sorted(ungrouped)


def groups_table(view: SwarmView, rtts: Rtts) -> Table | None:
    """One row per group (and one for the ungrouped peers); None when no member is in a group."""
    groups, ungrouped = group_summaries(view, rtts)
    if not groups:
        return None
    table = Table(title="groups", header_style="bold")
    table.add_column("group", no_wrap=True)
    table.add_column("size", justify="right")
    table.add_column("median RTT", justify="right", no_wrap=True)
    table.add_column("measured pairs", justify="right")
    table.add_column("members")
    for g in groups:
        table.add_row(
            g["group"],
            str(len(g["members"])),
            _ms(g["median_rtt_ms"]),
            f"{g['measured_pairs']}/{g['pairs']}",
            " ".join(short_peer_id(p) for p in g["members"]),
        )
    if ungrouped:
        table.add_row("(none)", str(len(ungrouped)), _DASH, _DASH, " ".join(short_peer_id(p) for p in ungrouped))
    return table


def status_report(view: SwarmView, rtts: Rtts | None = None, *, width: int | None = None) -> RenderableType:
    """The members table (fitted to ``width`` columns, if given), followed by the groups table when some member
    is in a group."""
    groups = groups_table(view, rtts or {})
    members = status_table(view, rtts, width=width)
    return members if groups is None else Group(members, groups)


def summary(view: SwarmView) -> dict[str, Any]:
    records = [m.record for m in view.members]
    return {
        "peers": len(records),
        "cpus": sum(r.hardware.cpus for r in records),
        "gpus": sum(1 for r in records if r.hardware.gpu),
        "ram_gb": round(sum(r.hardware.ram_gb for r in records), 1),
    }


_DROP_ORDER = (
    "version",
    "address",
    "seen",
    "hardware",
    "MB/s",
    "sent / recv",
    "step",
    "group",
    "rtt",
    "device",
    "tok/s",
    "mode",
)
"""Columns of the members table in the order they go when it is too wide; peer, role, round and loss stay."""
_ROLE_ORDER = {"bootstrap": 0, "peer": 1}


def status_table(view: SwarmView, rtts: Rtts | None = None, *, width: int | None = None) -> Table:
    """One row per member (bootstrap nodes first, then by peer id); its ``rtt`` column reads "median (peers
    measured)" from its own RTT record. With ``width``, the least important columns are left out until the
    table fits that many terminal columns without wrapping a cell."""
    rtts = rtts or {}
    totals = summary(view)
    rounds = [m.record.round for m in view.members if m.record.round is not None]
    training = f" · round {max(rounds)}" if rounds else ""
    spread = swarm_spread(m.record for m in view.members)
    if spread is not None:
        training += f" · parameter spread {spread[1]:.1e} at round {spread[0]} ({spread[2]} peers)"
    caption = (
        f"{totals['peers']} peers alive · {totals['cpus']} CPUs · {totals['gpus']} GPUs · "
        f"{totals['ram_gb']:.0f} GiB RAM{training} · read in {view.read_s * 1000:.0f} ms"
    )
    members = sorted(view.members, key=lambda m: (_ROLE_ORDER.get(m.record.role, 2), m.record.peer_id))
    columns: dict[str, tuple[str, list[str]]] = {}  # name -> (justify, cells)

    def column(name: str, cells: list[str], justify: str = "left") -> None:
        columns[name] = (justify, cells)

    records = [m.record for m in members]
    column("peer", [short_peer_id(r.peer_id) for r in records])
    column("address", [_addr(m) for m in members])
    column("role", [r.role for r in records])
    column("version", [r.version for r in records])
    column("hardware", [_hardware(m) for m in members])
    column("seen", [_age(m.last_seen_s) for m in members], "right")
    column("mode", [r.mode or _DASH for r in records])
    column("device", [r.device or _DASH for r in records])
    column("round", [_fmt(r.round, "d") for r in records], "right")
    column("step", [_fmt(r.step, "d") for r in records], "right")
    column("loss", [_fmt(r.loss, ".3f") for r in records], "right")
    column("tok/s", [_fmt(r.tokens_per_s, ",.0f") for r in records], "right")
    column("sent / recv", [
        _DASH if r.bytes_sent is None else f"{_bytes(r.bytes_sent)} / {_bytes(r.bytes_received)}" for r in records
    ], "right")  # fmt: skip
    column("MB/s", [_fmt(r.bandwidth, ".1f") for r in records], "right")
    column("rtt", [_rtt_cell(rtts.get(r.peer_id)) for r in records], "right")
    column("group", [r.group or _DASH for r in records])

    def build(names: list[str]) -> Table:
        table = Table(title=f"swarm [bold]{view.swarm}[/bold]", caption=caption, header_style="bold")
        for name in names:
            table.add_column(name, justify=columns[name][0], no_wrap=True)  # type: ignore[arg-type]
        for i in range(len(members)):
            table.add_row(*(columns[name][1][i] for name in names))
        return table

    names = list(columns)
    table = build(names)
    if width is None:
        return table
    console = Console(width=10_000)
    for drop in _DROP_ORDER:
        if Measurement.get(console, console.options, table).maximum <= width:
            break
        names.remove(drop)
        table = build(names)
    return table


def view_to_json(view: SwarmView, rtts: Rtts | None = None) -> dict[str, Any]:
    """The view as one JSON-able object: ``peers`` (each with ``rtt``: its median RTT in ms, how many peers it
    measured and its measurements, or None), ``groups`` and ``ungrouped`` (see :func:`group_summaries`), and
    ``spread``: the relative parameter spread at the latest round two peers report
    (:func:`~legion_swarm.train.metrics.swarm_spread`)."""
    rtts = rtts or {}
    peers = []
    for member in view.members:
        r = member.record
        measured = rtts.get(r.peer_id)
        found = rtt_summary(measured)
        rtt = None if found is None else {"median_ms": found[0], "peers": found[1], "to": dict(measured or {})}
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
                "device": r.device,
                "samples_per_s": r.samples_per_s,
                "bandwidth_mb_s": r.bandwidth,
                "data": list(r.data) if r.data is not None else None,
                "rtt": rtt,
            }
        )
    groups, ungrouped = group_summaries(view, rtts)
    spread = swarm_spread(m.record for m in view.members)
    return {
        "swarm": view.swarm,
        "read_at": view.read_at,
        "read_s": round(view.read_s, 4),
        "summary": summary(view),
        "peers": peers,
        "groups": groups,
        "ungrouped": ungrouped,
        "spread": None if spread is None else {"round": spread[0], "relative": spread[1], "peers": spread[2]},
    }
