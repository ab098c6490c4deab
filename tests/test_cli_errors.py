"""Bad input: one line on stderr, exit code 2 (1 for network failures), never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from legion_swarm.config import HostConfig
from legion_swarm.sim import start_process, stop_process
from legion_swarm.transport.host import Host
from tests.helpers.processes import plain_dht_node, run_cli

pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(120)]
PEER = "/ip4/127.0.0.1/tcp/{port}/p2p/QmdtW6xneAJGp1wtT5edc5K73XWU2uWXhNoEV1vFStwsWt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["join", "--peer", "not-a-multiaddr"], "malformed multiaddr"),
        (["join", "--peer", "/ip4/127.0.0.1/tcp/5"], "lacks /p2p/"),
        (["join"], "--peer"),
        (["bootstrap", "--port", "http"], "bad port"),
        (["bootstrap", "--heartbeat", "-1"], "positive"),
        (["bootstrap", "--swarm", "Bad Name"], "bad swarm name"),
        (["status", "--peer", PEER.format(port=1), "--watch", "0"], "positive"),
        (["simulate", "--peers", "0"], "bad peer count"),
        (["join", "--peer", PEER.format(port=1), "--nice", "20"], "expected 0-19"),
        (["join", "--peer", PEER.format(port=1), "--threads", "0"], "expected a positive integer"),
        (["bootstrap", "--lr", "fast"], "expected a number"),
        (["bootstrap", "--collective-plane", "udp"], "invalid choice"),
        (["bootstrap", "--collective-reduce-timeout-s", "1"], "stall_timeout_s must not exceed"),
        (["simulate", "--train-outer-momentum", "1"], "outer_momentum must be in [0, 1)"),
        (["bootstrap", "--no-such-flag"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
    ],
)
async def test_bad_arguments_exit_2_fast(args: list[str], fragment: str) -> None:
    result = await run_cli(*args, timeout=30)
    assert_one_line_error(result, 2, fragment)


async def test_unreadable_identity_file(tmp_path) -> None:
    key = tmp_path / "id.key"
    key.write_bytes(b"this is not a key")
    result = await run_cli("bootstrap", "--host", "127.0.0.1", "--port", "0", "--identity", str(key))
    assert_one_line_error(result, 2, "identity file", str(key))
    result = await run_cli("bootstrap", "--host", "127.0.0.1", "--port", "0", "--identity", str(tmp_path))
    assert_one_line_error(result, 2, "cannot read identity file")
    assert key.read_bytes() == b"this is not a key"  # nothing lost: a bad key is never replaced


async def test_port_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        result = await run_cli("bootstrap", "--host", "127.0.0.1", "--port", port)
    assert_one_line_error(result, 2, "address already in use", port)


async def test_unreachable_peer_exits_1_within_15_seconds() -> None:
    result = await run_cli("status", "--peer", PEER.format(port=free_port()), timeout=30)
    assert_one_line_error(result, 1, "initial peers")
    assert result.seconds < 15


async def test_wrong_swarm_name_and_debug_traceback() -> None:
    boot = await start_process("bootstrap", ["bootstrap", "--host", "127.0.0.1", "--port", "0", "--swarm", "right"])
    try:
        result = await run_cli("status", "--peer", boot.maddr, "--swarm", "wrong", timeout=30)
        assert_one_line_error(result, 2, "belongs to swarm 'right', not 'wrong'")
        result = await run_cli("join", "--peer", boot.maddr, "--swarm", "wrong", "--host", "127.0.0.1", "--debug")
        assert result.code == 2
        assert "Traceback" in result.stderr  # --debug shows where it came from
    finally:
        assert await stop_process(boot) == 0


@contextlib.asynccontextmanager
async def silent_tcp_port() -> AsyncIterator[str]:
    """A TCP port that accepts connections and says nothing: no libp2p behind it."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield PEER.format(port=server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def daemon_without_dht() -> AsyncIterator[str]:
    """A bare libp2p daemon: it answers dials, but serves neither legion's hello nor hivemind's DHT."""
    async with await Host.create(HostConfig(host="127.0.0.1")) as host:
        yield (await host.maddrs())[0]


@pytest.mark.parametrize("entry", [silent_tcp_port, daemon_without_dht], ids=["tcp-no-libp2p", "libp2p-no-dht"])
@pytest.mark.parametrize("command", ["join", "status"])
async def test_an_entry_speaking_neither_hello_nor_dht_exits_1_within_15_seconds(entry, command: str) -> None:
    listen = ("--host", "127.0.0.1", "--no-train") if command == "join" else ()
    async with entry() as maddr:
        result = await run_cli(command, "--peer", maddr, "--swarm", "x", *listen, timeout=30)
    assert_one_line_error(result, 1, "initial peers")
    assert result.seconds < 15


async def test_a_plain_dht_entry_needs_swarm() -> None:
    async with plain_dht_node() as entry:
        for args in (["status"], ["join", "--host", "127.0.0.1", "--no-train"]):
            result = await run_cli(*args, "--peer", entry, timeout=30)
            assert_one_line_error(result, 2, "--swarm", "not the legion hello")
