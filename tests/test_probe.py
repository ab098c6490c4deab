"""RTT probing: the sampling policy, the RTT record, the ping protocol, a probing swarm, and its status display."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import statistics

import msgpack
import numpy as np
import pytest
from hivemind.dht.validation import DHTRecord
from rich.console import Console

from legion_swarm.cli.render import group_summaries, status_report, view_to_json
from legion_swarm.config import DHTConfig, HostConfig, MembershipConfig, PeerConfig, ProbeConfig
from legion_swarm.dht.records import MAX_RTT_ENTRIES, Hardware, PeerRecord, RttRecord, parse_record
from legion_swarm.dht.validator import SignedSubkeyValidator
from legion_swarm.errors import ConfigError, ProtocolError, RecordError
from legion_swarm.groups.probe import MAX_REPEATS, PING_PROTOCOL, ping, rtt_matrix, select_targets, serve_ping
from legion_swarm.peer import Member, SwarmPeer, SwarmView
from legion_swarm.transport.framing import read_message, write_message
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import Identity, short_peer_id
from tests.helpers.polling import eventually
from tests.helpers.swarm import observer

logger = logging.getLogger(__name__)

# Valid-looking base58 peer ids (the record schema checks their shape).
B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
IDS = [f"Qm{B58[i // 58]}{B58[i % 58]}" + "x" * 42 for i in range(120)]
ME = IDS[0]


# ------------------------------------------------------------------------------------------- sampling policy


@pytest.mark.timeout(10)
def test_sample_is_bounded_excludes_self_and_is_all_others_when_small() -> None:
    members = IDS[:100]
    targets = select_targets(members, {}, me=ME, sample=8, rng=random.Random(1))
    assert len(targets) == len(set(targets)) == 8
    assert ME not in targets and set(targets) <= set(members)
    few = IDS[:6]
    assert select_targets(few, {}, me=ME, sample=8, rng=random.Random(1)) == sorted(few[1:])
    assert select_targets([ME], {}, me=ME, sample=8, rng=random.Random(1)) == []


@pytest.mark.timeout(10)
def test_sample_keeps_the_nearest_measured_and_explores_the_rest() -> None:
    members = IDS[:50]
    medians = {p: 100.0 + i for i, p in enumerate(members[1:])}  # members[1] nearest, then [2], ...
    medians[members[30]] = 1.0  # the nearest of all
    rng = random.Random(7)
    targets = select_targets(members, medians, me=ME, sample=8, rng=rng)
    assert targets[:4] == [members[30], members[1], members[2], members[3]]
    explored = set(targets[4:])
    assert len(explored) == 4 and not explored & set(targets[:4])
    # Over rounds, exploration reaches every member, while the nearest four stay in every sample.
    seen: set[str] = set()
    for _ in range(60):
        targets = select_targets(members, medians, me=ME, sample=8, rng=rng)
        assert targets[:4] == [members[30], members[1], members[2], members[3]]
        seen.update(targets)
    assert seen == set(members) - {ME}


@pytest.mark.timeout(10)
def test_sample_is_deterministic_given_a_seed_whatever_the_input_order() -> None:
    members = IDS[:40]
    medians = {p: float(i % 7) for i, p in enumerate(members)}
    first = select_targets(members, medians, me=ME, sample=6, rng=random.Random(42))
    shuffled = list(reversed(members))
    again = select_targets(shuffled, dict(reversed(medians.items())), me=ME, sample=6, rng=random.Random(42))
    assert first == again
    assert first != select_targets(members, medians, me=ME, sample=6, rng=random.Random(43))


@pytest.mark.timeout(10)
def test_departed_peers_self_and_bad_medians_are_never_kept() -> None:
    members = IDS[:20]
    departed = IDS[50:60]
    medians = {p: 0.1 for p in departed} | {ME: 0.0, members[5]: math.nan, members[9]: 3.0, members[10]: 4.0}
    targets = select_targets(members, medians, me=ME, sample=4, rng=random.Random(3))
    assert targets[:2] == [members[9], members[10]]
    assert not set(targets) & set(departed) and ME not in targets
    with pytest.raises(ValueError):
        select_targets(members, medians, me=ME, sample=0, rng=random.Random(3))


# --------------------------------------------------------------------------------------------- record schema


def rtt_wire(**changes: object) -> dict:
    wire = RttRecord(swarm="s", peer_id="QmPeer", sent_at=2.0, rtts={IDS[1]: 1.25, IDS[2]: 30}).to_wire()
    wire.update(changes)
    return wire


@pytest.mark.timeout(10)
def test_rtt_record_round_trips_and_passes_the_signed_validator() -> None:
    parsed = parse_record(rtt_wire())
    assert isinstance(parsed, RttRecord)
    assert parsed.rtts == {IDS[1]: 1.25, IDS[2]: 30.0} and isinstance(parsed.rtts[IDS[2]], float)
    assert parse_record(rtt_wire(rtts={})).rtts == {}
    # A full record, signed as the DHT stores it: accepted by another node, and a few kB.
    alice = Identity.generate()
    full = {p: 123.456 for p in IDS[1 : MAX_RTT_ENTRIES + 1]}
    payload = rtt_wire(peer_id=alice.peer_id, rtts=full)
    record = DHTRecord(b"\x01" * 20, msgpack.packb(alice.peer_id), msgpack.packb(payload), 100.0)
    record = dataclasses.replace(record, value=SignedSubkeyValidator(alice).sign_value(record))
    assert SignedSubkeyValidator(Identity.generate()).validate(record)
    assert len(record.value) < 6000, len(record.value)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("rtts", "reason"),
    [
        ({IDS[1]: math.nan}, "not a finite number"),
        ({IDS[1]: math.inf}, "not a finite number"),
        ({IDS[1]: -0.5}, "not a finite number"),
        ({p: 1.0 for p in IDS[1 : MAX_RTT_ENTRIES + 2]}, "more than 64"),
        ({IDS[1]: "3"}, "has type str"),
        ({IDS[1]: True}, "has type bool"),
        ({IDS[1]: None}, "has type NoneType"),
        ({7: 1.0}, "not a peer id"),
        ({"not/a/peer": 1.0}, "not a peer id"),
        ({"Qm0OIl" + "x" * 30: 1.0}, "not a peer id"),
        ([[IDS[1], 1.0]], "field 'rtts' has type list"),
    ],
)
def test_off_schema_rtt_records_are_refused(rtts: object, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        parse_record(rtt_wire(rtts=rtts))


@pytest.mark.timeout(10)
def test_rtt_record_refuses_a_self_measurement_and_missing_fields() -> None:
    with pytest.raises(RecordError, match="writer itself"):
        parse_record(rtt_wire(peer_id=IDS[1]))
    wire = rtt_wire()
    del wire["rtts"]
    with pytest.raises(RecordError, match="missing field 'rtts'"):
        parse_record(wire)


@pytest.mark.timeout(10)
def test_probe_config_is_validated() -> None:
    config = ProbeConfig()
    assert (config.interval_s, config.sample, config.repeats, config.first_delay_s) == (10.0, 8, 5, 1.0)
    assert config.record_ttl_s == 30.0 and PeerConfig().probe == config
    assert ProbeConfig(sample=MAX_RTT_ENTRIES, repeats=MAX_REPEATS).sample == MAX_RTT_ENTRIES
    for bad, reason in [
        ({"sample": 0}, "sample"),
        ({"sample": MAX_RTT_ENTRIES + 1}, "sample"),
        ({"sample": 2.0}, "sample"),
        ({"repeats": MAX_REPEATS + 1}, "repeats"),
        ({"interval_s": 0}, "interval_s"),
        ({"timeout_s": 11}, "must not exceed interval_s"),
        ({"concurrency": 0}, "concurrency"),
        ({"first_delay_s": -1}, "first_delay_s"),
        ({"ttl_intervals": 1.0}, "ttl_intervals"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            ProbeConfig(**bad)


@pytest.mark.timeout(10)
def test_cli_flag_maps_onto_the_probe_interval() -> None:
    from legion_swarm.cli import build_parser
    from legion_swarm.cli.commands import peer_config

    args = build_parser().parse_args(["join", "--peer", f"/ip4/127.0.0.1/tcp/1/p2p/{IDS[1]}", "--probe-interval", "1"])
    probe = peer_config(args, role="peer").probe
    assert (probe.interval_s, probe.timeout_s) == (1.0, 1.0)
    args = build_parser().parse_args(["bootstrap"])
    assert peer_config(args, role="bootstrap").probe == ProbeConfig()


# ------------------------------------------------------------------------------------------ status rendering


def member(peer_id: str, group: str | None) -> Member:
    record = PeerRecord(
        swarm="s", peer_id=peer_id, addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id}",), role="peer", version="0.1.0",
        hardware=Hardware(cpus=2, ram_gb=4.0), started_at=1.0, sent_at=2.0, group=group,
    )  # fmt: skip
    return Member(record, expires_at=20.0, last_seen_s=0.5)


@pytest.mark.timeout(10)
def test_status_shows_rtt_summaries_and_groups() -> None:
    a, b, c, d, e = IDS[1:6]
    view = SwarmView("s", (member(a, "2@aaaaaa"), member(b, "2@aaaaaa"), member(c, "2@cccccc"),
                           member(d, "2@cccccc"), member(e, None)), read_at=10.0, read_s=0.01)  # fmt: skip
    rtts = {
        a: {b: 10.0, c: 80.0, d: 90.0},
        b: {a: 12.0, e: 50.0},
        c: {d: 4.0},
        IDS[99]: {a: 1.0},  # an observer's or departed peer's record: not a member, not shown
    }
    report = view_to_json(view, rtts)
    by_id = {p["peer_id"]: p for p in report["peers"]}
    assert by_id[a]["rtt"] == {"median_ms": 80.0, "peers": 3, "to": rtts[a]}
    assert by_id[b]["rtt"]["median_ms"] == 31.0 and by_id[b]["rtt"]["peers"] == 2
    assert by_id[d]["rtt"] is None and by_id[e]["rtt"] is None
    groups = {g["group"]: g for g in report["groups"]}
    assert groups["2@aaaaaa"] == {
        "group": "2@aaaaaa", "members": sorted([a, b]), "median_rtt_ms": 12.0, "pairs": 1, "measured_pairs": 1,
    }  # fmt: skip
    assert groups["2@cccccc"]["median_rtt_ms"] == 4.0
    assert report["ungrouped"] == [e]

    console = Console(record=True, width=250)
    console.print(status_report(view, rtts))
    text = console.export_text()
    assert "80.0 ms (3)" in text and "31.0 ms (2)" in text
    assert "2@aaaaaa" in text and "12.0 ms" in text and "1/1" in text and "(none)" in text
    assert short_peer_id(e) in text


@pytest.mark.timeout(10)
def test_status_without_groups_or_rtts_keeps_the_old_output() -> None:
    view = SwarmView("s", (member(IDS[1], None), member(IDS[2], None)), read_at=10.0, read_s=0.01)
    groups, ungrouped = group_summaries(view, {})
    assert groups == [] and ungrouped == sorted(IDS[1:3])
    report = view_to_json(view)
    assert report["groups"] == [] and all(p["rtt"] is None for p in report["peers"])
    console = Console(record=True, width=250)
    console.print(status_report(view))
    text = console.export_text()
    assert "2 peers alive" in text and "groups" not in text
    # A group whose members measured nothing among themselves has no RTT to show.
    view = SwarmView("s", (member(IDS[1], "g"), member(IDS[2], "g"), member(IDS[3], None)), read_at=1, read_s=0)
    (group,), _ = group_summaries(view, {IDS[1]: {IDS[3]: 5.0}})
    assert group["median_rtt_ms"] is None and group["measured_pairs"] == 0


# ------------------------------------------------------------------------------------------ real p2p daemons

INTERVAL = 0.5


def peer_config(*entry: str, role: str = "peer", sample: int = 2) -> PeerConfig:
    return PeerConfig(
        host=HostConfig(host="127.0.0.1", initial_peers=entry),
        dht=DHTConfig(wait_timeout_s=2),
        membership=MembershipConfig(swarm="rtt", role=role, heartbeat_s=0.5),
        probe=ProbeConfig(interval_s=INTERVAL, timeout_s=INTERVAL, first_delay_s=0.2, sample=sample, ttl_intervals=4),
        join_timeout_s=10,
    )


@pytest.fixture
async def swarm(real_processes: None):
    """A bootstrap and three peers probing each other every 0.5 s, two peers per round."""
    boot = await SwarmPeer.create(peer_config(role="bootstrap"))
    peers = [boot]
    try:
        for _ in range(3):
            peers.append(await SwarmPeer.create(peer_config(boot.maddrs[0])))
        yield peers
    finally:
        errors = await asyncio.gather(*(p.aclose() for p in peers), return_exceptions=True)
        assert not [e for e in errors if e is not None], errors


@pytest.mark.timeout(90)
async def test_a_swarm_measures_publishes_and_reads_rtts(swarm: list[SwarmPeer]) -> None:
    ids = {p.peer_id for p in swarm}
    reader = swarm[-1]

    async def everyone_published() -> dict[str, dict[str, float]] | None:
        rtts = await reader.rtts()
        return rtts if set(rtts) == ids and all(len(row) >= 2 for row in rtts.values()) else None

    rtts = await eventually(everyone_published, timeout=30)
    for owner, row in rtts.items():
        assert 2 <= len(row) <= 3 and set(row) <= ids - {owner}  # its sample, never itself
        assert all(0 < ms < 250 for ms in row.values()), row  # loopback
    matrix = rtt_matrix(rtts, ids)
    assert matrix.peers == tuple(sorted(ids))
    assert int(matrix.measured.sum()) - len(ids) >= 2 * len(ids)  # every peer measured at least 2 others
    assert all(0 < matrix.rtt(a, b) < 250 for a in ids for b in ids if a != b)
    values = sorted(ms for row in rtts.values() for ms in row.values())
    logger.warning("loopback RTT medians: %.2f ms (%.2f-%.2f)", statistics.median(values), values[0], values[-1])

    # A direct ping, and the probers' bookkeeping: a peer that leaves drops out of every prober's medians.
    assert 0 < await ping(swarm[1].host, swarm[2].peer_id, repeats=5, timeout=5, maddrs=swarm[2].maddrs) < 250
    leaver = swarm.pop()
    await leaver.aclose()

    async def forgotten() -> bool:
        return all(p.prober is not None and leaver.peer_id not in p.prober.medians for p in swarm)

    await eventually(forgotten, timeout=20)

    async def kept_probing() -> bool:  # the leaver may be forgotten within the first round: wait for the next
        return all(p.prober is not None and p.prober.rounds >= 2 and p.prober.published >= 1 for p in swarm)

    await eventually(kept_probing, timeout=20)


@pytest.mark.usefixtures("real_processes")
@pytest.mark.timeout(60)
async def test_ping_to_a_peer_without_the_protocol_fails_cleanly() -> None:
    boot = await SwarmPeer.create(peer_config(role="bootstrap"))
    try:
        async with observer(boot.maddrs[0], swarm="rtt") as obs:  # observers neither probe nor answer pings
            assert obs.prober is None
            with pytest.raises(ProtocolError, match="protocols not supported"):
                await ping(boot.host, obs.peer_id, repeats=3, timeout=5, maddrs=obs.maddrs)
            assert 0 < await ping(obs.host, boot.peer_id, repeats=3, timeout=5, maddrs=boot.maddrs) < 250
    finally:
        await boot.aclose()


@pytest.mark.usefixtures("real_processes")
@pytest.mark.timeout(60)
async def test_garbage_is_rejected_on_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    server = await Host.create(HostConfig(host="127.0.0.1"))
    client = await Host.create(HostConfig(host="127.0.0.1"))
    try:
        await serve_ping(server, timeout_s=2)
        await client.connect(server.peer_id, await server.maddrs())
        # A client that skips a sequence number: the server drops the stream and says why.
        caplog.set_level(logging.INFO, logger="legion_swarm.groups.probe")
        reader, writer = await client.open_stream(server.peer_id, PING_PROTOCOL)
        try:
            await write_message(writer, {"ping": 0, "of": 3})
            assert await read_message(reader) == {"pong": 0}
            await write_message(writer, {"ping": 2, "of": 3})
            with pytest.raises(ProtocolError, match="stream ended"):
                await asyncio.wait_for(read_message(reader), 5)
        finally:
            writer.close()
        await eventually(lambda: _logged(caplog, "expected ping 1"), timeout=5)

        # A server that answers the wrong pong: the client refuses the measurement.
        async def liar(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await read_message(reader)
                await write_message(writer, {"pong": "soon"})
            finally:
                writer.close()

        await client.add_stream_handler(PING_PROTOCOL, liar)
        await server.connect(client.peer_id, await client.maddrs())
        with pytest.raises(ProtocolError, match="answered ping 0 with"):
            await ping(server, client.peer_id, repeats=3, timeout=5)
    finally:
        await asyncio.gather(server.aclose(), client.aclose())


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(10)
def test_status_reports_the_parameter_spread_of_the_latest_common_round() -> None:
    def at(peer_id: str, round_: int, values: list[float]) -> Member:
        m = member(peer_id, "2@aaaaaa")
        sample = np.asarray(values, dtype=np.float32).tobytes()
        return Member(dataclasses.replace(m.record, round=round_, sample=sample), m.expires_at, m.last_seen_s)

    # Round 8 is the latest that two peers report; the peer alone at round 9 is not compared with anyone.
    view = SwarmView("s", (at(IDS[1], 8, [3.0, 4.0]), at(IDS[2], 8, [3.0, 4.0]), at(IDS[3], 8, [3.0, 4.5]),
                           at(IDS[4], 9, [9.0, 9.0])), read_at=10.0, read_s=0.01)  # fmt: skip
    spread = view_to_json(view)["spread"]
    assert spread["round"] == 8 and spread["peers"] == 3 and 0.05 < spread["relative"] < 0.07
    console = Console(record=True, width=250)
    console.print(status_report(view))
    assert "parameter spread" in console.export_text()
    assert view_to_json(SwarmView("s", (member(IDS[1], None),), read_at=1.0, read_s=0.0))["spread"] is None


@pytest.mark.timeout(10)
def test_the_status_table_fits_100_columns_without_wrapping_and_lists_bootstrap_nodes_first() -> None:
    """A training swarm's full row is ~200 columns wide; at 100 the least important columns go, every row stays
    one line, and what is left still names each peer with its role, device, round and loss."""
    from dataclasses import replace

    training = dict(
        mode="diloco", device="cuda:0/bf16", round=1234, step=24680, loss=2.3456, tokens_per_s=123456.0,
        bytes_sent=123_456_789, bytes_received=123_456_789, bandwidth=11.3, group="4@3fa2c1",
    )  # fmt: skip
    ids = [f"12D3KooW{n}" + "abcdefghijkmnopqrstuvwxyzABCDEFGH"[n] * 30 for n in range(7)]  # distinct short ids
    peers = [member(ids[i], "4@3fa2c1") for i in range(1, 6)]
    peers = [Member(replace(m.record, **training), m.expires_at, m.last_seen_s) for m in peers]
    boot = member(ids[6], None)
    boot = Member(replace(boot.record, role="bootstrap"), boot.expires_at, boot.last_seen_s)
    view = SwarmView("s", (*peers, boot), read_at=10.0, read_s=0.01)
    rtts = {ids[1]: {ids[2]: 12.5, ids[3]: 80.0}}

    wide = Console(record=True, width=400)
    wide.print(status_report(view, rtts))
    full = [line for line in wide.export_text().splitlines() if line.startswith(f"│ {short_peer_id(ids[1])}")]
    assert len(full) == 1 and len(full[0].rstrip()) > 150  # the whole row would not fit

    console = Console(record=True, width=100)
    console.print(status_report(view, rtts, width=100))
    lines = console.export_text().splitlines()
    assert all(len(line.rstrip()) <= 100 for line in lines)
    rows = [line for line in lines if any(line.startswith(f"│ {short_peer_id(ids[i])}") for i in range(1, 7))]
    assert len(rows) == 6  # one line per member: no cell wrapped onto a second line
    assert short_peer_id(ids[6]) in rows[0] and "bootstrap" in rows[0]  # bootstrap nodes first
    assert "…" not in "".join(rows)  # nothing truncated either
    for row in rows[1:]:
        assert "peer" in row and "cuda:0/bf16" in row and "1234" in row and "2.346" in row
