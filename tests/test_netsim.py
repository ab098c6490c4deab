"""netsim: the NetSim file format, the delivery schedule, and delays measured on real sockets and real p2pd hosts.

Timing assertions are one-sided where the machine's load can only add time (a delivery is never early), and
generous above (a shared 2-core box): each measured round trip is at least the injected RTT (0.9x on uvloop,
whose clock has millisecond resolution) and, in the median, less than RTT + 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

from legion_swarm.config import HostConfig
from legion_swarm.errors import ConfigError
from legion_swarm.sim import LocalSwarm, NetSimSpec
from legion_swarm.transport.dataplane import DataPlane
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import Identity
from legion_swarm.transport.netsim import WINDOW_BYTES, DelayedTransport, NetSim, Pipe, Shaper
from legion_swarm.transport.secure import secure_accept, secure_connect
from tests.helpers.processes import run_cli

HOST = "127.0.0.1"
RTT_S = 0.08
TWO_REGIONS = {"r0": {"r0": 2, "r1": RTT_S * 1000}, "r1": {"r0": RTT_S * 1000, "r1": 2}}
PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmdtW6xneAJGp1wtT5edc5K73XWU2uWXhNoEV1vFStwsWt"


def two_peers(bandwidth_mbit: float | None = None) -> NetSim:
    return NetSim(regions={"A": "r0", "B": "r1"}, rtt_ms=TWO_REGIONS, bandwidth_mbit=bandwidth_mbit)


# ------------------------------------------------------------------------------------------ file format


@pytest.mark.timeout(10)
def test_load_round_trip_and_queries(tmp_path) -> None:
    path = tmp_path / "netsim.json"
    path.write_text(json.dumps({"regions": {"A": "r0", "B": "r1", "C": "r1"}, "rtt_ms": TWO_REGIONS,
                                "bandwidth_mbit": 100}))  # fmt: skip
    netsim = NetSim.load(str(path))
    assert netsim.one_way_s("A", "B") == netsim.one_way_s("B", "A") == RTT_S / 2
    assert netsim.one_way_s("B", "C") == 0.001
    assert netsim.bytes_per_s("A", "B") == 100e6 / 8
    # A peer outside the map (a status observer) gets no delay and no limit, both ways.
    assert netsim.one_way_s("A", "observer") == netsim.one_way_s("observer", "A") == 0.0
    assert netsim.bytes_per_s("observer", "A") is None
    (tmp_path / "again.json").write_text(netsim.to_json())
    assert NetSim.load(str(tmp_path / "again.json")) == netsim
    assert NetSim.from_dict({"regions": {}, "rtt_ms": {"r": {"r": 0}}}).bandwidth_mbit is None


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"regions": {}}', "missing key(s) ['rtt_ms']"),
        ('{"regions": {}, "rtt_ms": {}, "latency": 5}', "unknown key(s) ['latency']"),
        ('{"regions": {"A": "r9"}, "rtt_ms": {"r0": {"r0": 1}}}', "unknown region 'r9'"),
        ('{"regions": {}, "rtt_ms": {"r0": {"r0": 1, "r1": 5}}}', "names unknown region 'r1'"),
        ('{"regions": {}, "rtt_ms": {"r0": {"r0": 1}, "r1": {"r1": 1}}}', "no entry for 'r0' -> 'r1'"),
        ('{"regions": {}, "rtt_ms": {"r0": {"r0": 1, "r1": 5}, "r1": {"r0": 6, "r1": 1}}}', "not symmetric"),
        ('{"regions": {}, "rtt_ms": {"r0": {"r0": -1}}}', "rtt_ms['r0']['r0'] must be >= 0"),
        ('{"regions": {}, "rtt_ms": {"r0": {"r0": "5"}}}', "must be a number"),
        ('{"regions": {}, "rtt_ms": {"r0": {"r0": 1}}, "bandwidth_mbit": 0}', "bandwidth_mbit must be > 0"),
        ('{"regions": {}, "rtt_ms": {"r0": {"r0": 1}}, "bandwidth_mbit": true}', "must be a number"),
        ('{"regions": {"A": 3}, "rtt_ms": {"r0": {"r0": 1}}}', "map peer ids to region names"),
    ],
)
def test_bad_files_are_config_errors_naming_the_problem(tmp_path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as error:
        NetSim.load(str(path))
    assert fragment in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.timeout(10)
def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=re.escape("cannot read netsim file '/nonexistent/x.json': No such file")):
        NetSim.load("/nonexistent/x.json")


@pytest.mark.timeout(10)
def test_round_robin() -> None:
    netsim = NetSim.round_robin(["p0", "p1", "p2", "p3", "p4"], 2, rtt_across_ms=120, rtt_inside_ms=4,
                                bandwidth_mbit=50)  # fmt: skip
    assert [netsim.regions[p] for p in ("p0", "p1", "p2", "p3", "p4")] == ["r0", "r1", "r0", "r1", "r0"]
    assert netsim.rtt_ms == {"r0": {"r0": 4, "r1": 120}, "r1": {"r0": 120, "r1": 4}}
    assert netsim.one_way_s("p0", "p1") == 0.06 and netsim.one_way_s("p0", "p2") == 0.002
    assert netsim.bandwidth_mbit == 50
    with pytest.raises(ConfigError, match="at least one region"):
        NetSim.round_robin(["p0"], 0, rtt_across_ms=1, rtt_inside_ms=1)


# ------------------------------------------------------------------------------------------------ schedule


@pytest.mark.timeout(10)
def test_schedule_without_bandwidth_is_a_pure_delay() -> None:
    pipe = Pipe(0.05)
    assert [pipe.due(t, 10_000_000) for t in (1.0, 1.0, 1.2)] == [1.05, 1.05, 1.25]


@pytest.mark.timeout(10)
def test_schedule_with_bandwidth_queues_at_the_bottleneck() -> None:
    pipe = Pipe(0.05, bytes_per_s=1000.0)
    assert pipe.due(10.0, 100) == pytest.approx(10.1 + 0.05)  # serialised, then propagated
    assert pipe.due(10.0, 100) == pytest.approx(10.2 + 0.05)  # behind the first chunk
    assert pipe.due(10.05, 50) == pytest.approx(10.25 + 0.05)  # still behind: the link is busy until 10.2
    assert pipe.due(20.0, 100) == pytest.approx(20.1 + 0.05)  # idle link: back to now + len/bw + one_way


@pytest.mark.timeout(10)
def test_shaper_shares_one_pipe_per_remote_and_skips_unmapped_peers() -> None:
    shaper = Shaper(two_peers(bandwidth_mbit=8), "A")
    pipe = shaper.pipe("B")
    assert pipe is not None and pipe is shaper.pipe("B")
    assert (pipe.one_way_s, pipe.bytes_per_s) == (RTT_S / 2, 1e6)
    assert shaper.pipe("observer") is None
    assert Shaper(two_peers(), "observer").pipe("A") is None


# ------------------------------------------------------------------------------------- loopback sockets


@contextlib.asynccontextmanager
async def delayed_pair(
    netsim: NetSim,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP connection on loopback between "A" (dialer) and "B", each side's writer delayed by its Shaper."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait((reader, writer))

    server = await asyncio.start_server(on_connection, HOST, 0)
    writers: list[asyncio.StreamWriter] = []
    try:
        reader_a, writer_a = await asyncio.open_connection(HOST, server.sockets[0].getsockname()[1])
        writers.append(writer_a)
        reader_b, writer_b = await asyncio.wait_for(accepted.get(), 5)
        writers.append(writer_b)
        writers[:] = [Shaper(netsim, "A").wrap(writer_a, "B"), Shaper(netsim, "B").wrap(writer_b, "A")]
        assert all(isinstance(w.transport, DelayedTransport) for w in writers)
        yield reader_a, writers[0], reader_b, writers[1]
    finally:
        for writer in writers:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


async def ping_pong_rtts(netsim: NetSim, rounds: int) -> list[float]:
    async with delayed_pair(netsim) as (reader_a, writer_a, reader_b, writer_b):
        rtts = []
        for i in range(rounds):
            started = time.perf_counter()
            writer_a.write(b"ping%04d" % i)
            assert await reader_b.readexactly(8) == b"ping%04d" % i
            writer_b.write(b"pong%04d" % i)
            assert await reader_a.readexactly(8) == b"pong%04d" % i
            rtts.append(time.perf_counter() - started)
        return rtts


@pytest.mark.timeout(20)
async def test_ping_pong_sees_the_injected_rtt() -> None:
    rtts = await ping_pong_rtts(two_peers(), 5)
    assert min(rtts) >= RTT_S, rtts
    assert statistics.median(rtts) < RTT_S + 0.05, rtts


@pytest.mark.timeout(20)
async def test_ping_pong_on_uvloop() -> None:
    # uvloop's clock (and so its timers) has millisecond resolution: a delivery may be up to 1 ms early.
    rtts = await asyncio.wait_for(asyncio.to_thread(uvloop.run, ping_pong_rtts(two_peers(), 5)), 15)
    assert min(rtts) >= 0.9 * RTT_S, rtts
    assert statistics.median(rtts) < RTT_S + 0.05, rtts


@pytest.mark.timeout(20)
async def test_writes_are_pipelined_in_order_not_serialised() -> None:
    """20 messages written back to back all arrive about one one-way delay later, not 20 of them later."""
    one_way = RTT_S / 2
    async with delayed_pair(two_peers()) as (_, writer_a, reader_b, _):
        messages = [os.urandom(1000) for _ in range(20)]
        started = time.perf_counter()
        for m in messages:
            writer_a.write(m)
            await writer_a.drain()  # returns at once: the bytes are in flight, not in the sender's way
        assert time.perf_counter() - started < one_way
        for m in messages:
            assert await reader_b.readexactly(len(m)) == m
        elapsed = time.perf_counter() - started
        assert one_way <= elapsed < one_way + 0.05, elapsed


@pytest.mark.timeout(20)
async def test_bulk_transfer_under_a_bandwidth_limit() -> None:
    """size / bandwidth + one way, at least; sent while the receiver reads, in order."""
    mbit = 16.0  # 2 MB/s
    size = 1_000_000
    one_way = RTT_S / 2
    async with delayed_pair(two_peers(bandwidth_mbit=mbit)) as (_, writer_a, reader_b, _):
        payload = os.urandom(size)
        started = time.perf_counter()

        async def send() -> None:
            for offset in range(0, size, 100_000):
                writer_a.write(payload[offset : offset + 100_000])
                await writer_a.drain()

        _, got = await asyncio.gather(send(), reader_b.readexactly(size))
        elapsed = time.perf_counter() - started
        assert got == payload
        floor = size / (mbit * 1e6 / 8) + one_way
        assert floor <= elapsed < floor + 0.3, elapsed


@pytest.mark.timeout(30)
async def test_backpressure_bounds_what_is_in_flight() -> None:
    """A sender that drains never has much more than WINDOW_BYTES queued, and a receiver that does not read
    stops it; every byte arrives, in order."""
    chunk = 1 << 20
    total = 3 * WINDOW_BYTES
    one_way = 0.2  # long enough that nothing can be due while the test looks at the stuck sender
    far = NetSim(regions={"A": "r0", "B": "r1"}, rtt_ms={"r0": {"r0": 0, "r1": 400}, "r1": {"r0": 400, "r1": 0}})
    # After a write: the queue was below WINDOW + high (64 KiB) before it, plus the chunk; the real transport
    # holds at most its own high-water mark (64 KiB) plus one chunk.
    bound = WINDOW_BYTES + 2 * chunk + (128 << 10)
    async with delayed_pair(far) as (_, writer_a, reader_b, _):
        payload = os.urandom(total)
        queued = []

        async def send() -> None:
            for offset in range(0, total, chunk):
                writer_a.write(payload[offset : offset + chunk])
                queued.append(writer_a.transport.get_write_buffer_size())
                await writer_a.drain()

        sending = asyncio.create_task(send())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(sending), one_way / 4)
        assert WINDOW_BYTES < writer_a.transport.get_write_buffer_size() <= bound
        assert len(queued) < total // chunk
        assert await reader_b.readexactly(total) == payload
        await sending
        assert max(queued) <= bound, max(queued)


@pytest.mark.timeout(20)
async def test_close_and_eof_come_after_the_pending_bytes() -> None:
    one_way = RTT_S / 2
    async with delayed_pair(two_peers()) as (reader_a, writer_a, reader_b, writer_b):
        started = time.perf_counter()
        writer_a.write(b"last words")
        writer_a.close()
        assert writer_a.is_closing()
        assert await reader_b.read() == b"last words"  # read() returns at EOF: the bytes came first
        assert time.perf_counter() - started >= one_way
        await writer_a.wait_closed()
    async with delayed_pair(two_peers()) as (reader_a, writer_a, reader_b, writer_b):
        writer_b.write(b"tail")
        writer_b.write_eof()
        with pytest.raises(RuntimeError):
            writer_b.write(b"after eof")
        assert await reader_a.read() == b"tail"


@pytest.mark.timeout(20)
async def test_abort_drops_the_queue_and_leaves_no_timer_or_task() -> None:
    tasks_before = asyncio.all_tasks()
    async with delayed_pair(two_peers()) as (_, writer_a, reader_b, _):
        transport = writer_a.transport
        assert isinstance(transport, DelayedTransport)
        writer_a.write(b"x" * 100_000)
        assert transport.get_write_buffer_size() >= 100_000
        assert asyncio.all_tasks() == tasks_before  # a loop timer, not a task per link
        transport.abort()
        assert transport.get_write_buffer_size() == 0 and transport._timer is None
        assert await reader_b.read() == b""  # the peer sees the connection end, and none of the dropped bytes


# ------------------------------------------------------------------------------------------ real hosts


@pytest.mark.usefixtures("real_processes")
@pytest.mark.timeout(60)
async def test_hosts_delay_streams_and_data_channels(tmp_path) -> None:
    """Two p2pd hosts in two regions: a request/response over a libp2p stream, and round trips over the data
    plane (direct TCP and the libp2p plane), each take at least the injected RTT."""
    ids = [Identity.generate(), Identity.generate()]
    netsim = NetSim.round_robin([i.peer_id for i in ids], 2, rtt_across_ms=RTT_S * 1000, rtt_inside_ms=2)
    path = tmp_path / "netsim.json"
    path.write_text(netsim.to_json())
    config = HostConfig(host=HOST, netsim=str(path))
    a = await Host.create(config, ids[0])
    planes: list[DataPlane] = []
    try:
        b = await Host.create(config, ids[1])
        try:
            assert a.netsim == netsim and a.shaper is not None

            async def echo(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                assert isinstance(writer.transport, DelayedTransport)
                writer.write(await reader.readexactly(4))
                await writer.drain()
                writer.close()

            await a.add_stream_handler("/legion-test/echo/1", echo)
            await b.connect(a.peer_id, await a.maddrs())
            reader, writer = await b.open_stream(a.peer_id, "/legion-test/echo/1")
            try:
                started = time.perf_counter()
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                assert time.perf_counter() - started >= RTT_S
            finally:
                writer.close()

            planes.append(await DataPlane.create(a.identity, host=a, listen=HOST))
            planes.append(await DataPlane.create(b.identity, host=b, listen=HOST))
            assert planes[0].shaper is a.shaper
            for plane in ("direct", "libp2p"):
                route = plane.encode()
                async with planes[0].expect(route) as inbox:
                    started = time.perf_counter()
                    dialer = await planes[1].connect(a.peer_id, route, direct=planes[0].endpoint, plane=plane)
                    connected = time.perf_counter() - started
                    acceptor = await asyncio.wait_for(inbox.get(), 5)
                    async with dialer, acceptor:
                        if plane == "direct":  # the handshake is 2 round trips, all delayed
                            assert connected >= 2 * RTT_S, connected
                        rtts = []
                        for _ in range(3):
                            started = time.perf_counter()
                            await dialer.send(b"ping")
                            assert await acceptor.recv(10) == b"ping"
                            await acceptor.send(b"pong")
                            assert await dialer.recv(10) == b"pong"
                            rtts.append(time.perf_counter() - started)
                        assert min(rtts) >= RTT_S, (plane, rtts)
                        assert statistics.median(rtts) < RTT_S + 0.1, (plane, rtts)
        finally:
            for plane in planes:
                await plane.aclose()
            await b.aclose()
    finally:
        await a.aclose()


@pytest.mark.timeout(30)
async def test_secure_channel_on_uvloop_with_netsim() -> None:
    """The direct plane's channel (a buffered protocol that takes the transport over) on uvloop, delayed."""

    async def scenario() -> list[float]:
        ids = {"A": Identity.generate(), "B": Identity.generate()}
        netsim = NetSim(regions={ids["A"].peer_id: "r0", ids["B"].peer_id: "r1"}, rtt_ms=TWO_REGIONS)
        accepted: asyncio.Queue = asyncio.Queue()

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            shaper = Shaper(netsim, ids["B"].peer_id)
            accepted.put_nowait(await secure_accept(reader, writer, ids["B"], lambda _: True, 5, shaper=shaper))

        server = await asyncio.start_server(on_connection, HOST, 0)
        try:
            port = server.sockets[0].getsockname()[1]
            shaper = Shaper(netsim, ids["A"].peer_id)
            async with await secure_connect(HOST, port, ids["A"], ids["B"].peer_id, 5, shaper=shaper) as dialer:
                async with await asyncio.wait_for(accepted.get(), 5) as acceptor:
                    big = os.urandom(3 << 20)
                    _, got = await asyncio.gather(dialer.send(big), acceptor.recv(4 << 20))
                    assert got == big
                    rtts = []
                    for _ in range(3):
                        started = time.perf_counter()
                        await dialer.send(b"ping")
                        await acceptor.send(await acceptor.recv(10))
                        assert await dialer.recv(10) == b"ping"
                        rtts.append(time.perf_counter() - started)
                    return rtts
        finally:
            server.close()
            await server.wait_closed()

    rtts = await asyncio.wait_for(asyncio.to_thread(uvloop.run, scenario()), 20)
    assert min(rtts) >= 0.9 * RTT_S, rtts
    assert statistics.median(rtts) < RTT_S + 0.05, rtts


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.mark.usefixtures("real_processes")
@pytest.mark.timeout(120)
async def test_local_swarm_runs_its_processes_under_a_netsim() -> None:
    spec = NetSimSpec(regions=2, rtt_across_ms=80, rtt_inside_ms=4)
    async with await LocalSwarm.create(1, swarm="netsim", peer_args=("--no-train",), netsim=spec) as swarm:
        assert swarm.bootstrap is not None and swarm.netsim is not None
        (peer,) = swarm.peers
        assert swarm.netsim.regions == {swarm.bootstrap.peer_id: "r0", peer.peer_id: "r1"}
        netsim_file = swarm.bootstrap.argv[swarm.bootstrap.argv.index("--netsim") + 1]
        assert peer.argv[peer.argv.index("--netsim") + 1] == netsim_file
        assert NetSim.load(netsim_file) == swarm.netsim
        assert any("netsim from" in line and "region r1" in line for line in peer.output), peer.tail()
    assert not Path(netsim_file).parent.exists()  # keys and JSON are gone with the swarm


@pytest.mark.usefixtures("real_processes")
@pytest.mark.timeout(60)
async def test_cli_refuses_a_bad_netsim_file(tmp_path) -> None:
    result = await run_cli("join", "--netsim", "/nonexistent", "--peer", PEER, timeout=30)
    assert result.code == 2, (result.code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--netsim" in lines[0] and "cannot read netsim file '/nonexistent'" in lines[0], lines[0]

    bad = tmp_path / "asymmetric.json"
    bad.write_text('{"regions": {}, "rtt_ms": {"r0": {"r0": 1, "r1": 5}, "r1": {"r0": 6, "r1": 1}}}')
    result = await run_cli("bootstrap", "--host", HOST, "--port", "0", "--netsim", str(bad), timeout=30)
    assert result.code == 2 and "not symmetric" in result.stderr, result.stderr
