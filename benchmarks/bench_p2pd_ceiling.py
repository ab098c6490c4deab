"""The libp2p daemons' ceiling for one all-reduce round's traffic: ``--peers`` processes on loopback, each with its
own ``p2pd`` (:class:`~legion_swarm.transport.host.Host`), move the bytes of a sharded all-reduce and nothing else.

A sharded all-reduce of G members × 100 MB (25 M float32) has every member send a 100/G MB shard to each other
member in reduce-scatter and the same again in all-gather: with G = 4, 150 MB out and 150 MB in per member, 600 MB
in all. Here each peer process (this script, started with ``multiprocessing``'s spawn context, uvloop) opens one
stream per ordered pair (:func:`~legion_swarm.transport.p2p_stream.open_stream_channel`; it receives on the
streams the others opened to it, wrapped in :class:`~legion_swarm.transport.p2p_stream.StreamChannel`), and a
round is two phases: every peer sends ``--phase-mb`` MB to each other peer in 4 MiB messages while it receives as
much from each, straight into preallocated buffers (``recv_into``; the channel's CRC-32 is the only other Python
work); a peer starts the second phase once its first is done. Streams are reused across rounds. Rounds start on a
barrier (the parent releases all peers once every one has reported ready); a round's time is its slowest peer's.
One warm-up round, then ``--repeats`` rounds, median reported: compare it with a round of
``benchmarks/bench_collectives.py`` on the libp2p-stream plane to see what is left above the daemons.

    python benchmarks/bench_p2pd_ceiling.py                        # 4 peers x 2 phases x 25 MB to each other, ~20 s
    python benchmarks/bench_p2pd_ceiling.py --phase-mb 2 --repeats 1

Prints one JSON object: ``setup``, ``seconds`` (median round), ``samples`` (each timed round), ``warmup_seconds``,
``gb_per_s`` (all peers' bytes sent in a median round / its time), and ``cpu_per_round``: CPU seconds (user +
system, from ``/proc/<pid>/stat``, 10 ms ticks) per timed round of each peer's Python process and of its ``p2pd``,
in peer order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from legion_swarm.config import HostConfig
from legion_swarm.transport.host import Host
from legion_swarm.transport.p2p_stream import StreamChannel, open_stream_channel

PROTOCOL = "/legion/bench/p2pd-ceiling/1"
MB = 1_000_000
MiB = 1 << 20
MESSAGE_BYTES = 4 * MiB
PHASES = 2  # reduce-scatter, then all-gather
SETUP_TIMEOUT_S = 60.0  # daemon start, connections, streams
ROUND_TIMEOUT_S = 300.0  # the parent's wait for a peer's round report
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()  # after the command name: field 3 (state) onwards
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # fields 14 (utime) and 15 (stime)


# ----------------------------------------------------------------------------------------------- a peer


async def exchange(out: StreamChannel, into: StreamChannel, payload: memoryview, buffer: memoryview) -> None:
    """Send ``payload`` on ``out`` and receive as many bytes from ``into`` into ``buffer``, concurrently."""

    async def send() -> None:
        for offset in range(0, len(payload), MESSAGE_BYTES):
            await out.send(payload[offset : offset + MESSAGE_BYTES])

    async def receive() -> None:
        for offset in range(0, len(buffer), MESSAGE_BYTES):
            piece = buffer[offset : offset + MESSAGE_BYTES]
            if (n := await into.recv_into(piece)) != len(piece):
                raise RuntimeError(f"expected a {len(piece)}-byte message, got {n} bytes")

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(send())
        tasks.create_task(receive())


async def peer(conn: Connection, n_peers: int, phase_bytes: int) -> None:
    """One peer: start a host, report it, connect to the others, then run rounds until the parent says stop."""
    loop = asyncio.get_running_loop()

    async def from_parent() -> Any:  # in a thread: the event loop keeps serving the daemon meanwhile
        return await loop.run_in_executor(None, conn.recv)

    host = await Host.create(HostConfig(host="127.0.0.1"))
    channels: list[StreamChannel] = []
    try:
        incoming: dict[str, StreamChannel] = {}
        all_incoming = asyncio.Event()

        async def on_stream(stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            remote = stream_info.peer_id.to_base58()
            channel = StreamChannel(reader, writer, local_peer_id=host.peer_id, remote_peer_id=remote)
            channels.append(channel)
            incoming[remote] = channel
            if len(incoming) == n_peers - 1:
                all_incoming.set()

        await host.add_stream_handler(PROTOCOL, on_stream)
        daemon_pid = host.daemon_pid
        assert daemon_pid is not None
        conn.send({"peer_id": host.peer_id, "maddrs": await host.maddrs(), "daemon_pid": daemon_pid})

        others = [p for p in await from_parent() if p["peer_id"] != host.peer_id]
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            await asyncio.gather(*(host.connect(p["peer_id"], p["maddrs"]) for p in others))
            outgoing: dict[str, StreamChannel] = {}
            for p in others:
                outgoing[p["peer_id"]] = await open_stream_channel(host, p["peer_id"], PROTOCOL, SETUP_TIMEOUT_S)
                channels.append(outgoing[p["peer_id"]])
            await all_incoming.wait()
        if set(incoming) != set(outgoing):
            raise RuntimeError(f"streams accepted from unexpected peers: {sorted(set(incoming) - set(outgoing))}")

        payload = memoryview(os.urandom(phase_bytes))  # incompressible, though nothing on the path compresses
        buffers = {peer_id: memoryview(bytearray(phase_bytes)) for peer_id in outgoing}  # reused by both phases
        conn.send({"ready": True})
        while await from_parent() == "go":
            cpu_python, cpu_daemon = cpu_seconds(os.getpid()), cpu_seconds(daemon_pid)
            start = time.perf_counter()
            for _ in range(PHASES):
                async with asyncio.TaskGroup() as tasks:
                    for peer_id, out in outgoing.items():
                        tasks.create_task(exchange(out, incoming[peer_id], payload, buffers[peer_id]))
            seconds = time.perf_counter() - start
            conn.send(
                {
                    "seconds": seconds,
                    "cpu_python": cpu_seconds(os.getpid()) - cpu_python,
                    "cpu_p2pd": cpu_seconds(daemon_pid) - cpu_daemon,
                }
            )
    finally:
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.aclose()
        await host.aclose()


def peer_process(conn: Connection, n_peers: int, phase_bytes: int) -> None:
    """Entry point of a peer process: run :func:`peer` on uvloop, report a failure to the parent."""
    import uvloop

    try:
        uvloop.run(peer(conn, n_peers, phase_bytes))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send({"error": traceback.format_exc()})
        raise


# ---------------------------------------------------------------------------------------------- parent


def receive(conn: Connection, timeout: float) -> dict[str, Any]:
    """The next message from a peer; raise if it fails, exits or stays silent for ``timeout`` seconds."""
    if not conn.poll(timeout):
        raise TimeoutError(f"a peer said nothing for {timeout} s")
    try:
        message = conn.recv()
    except EOFError:
        raise RuntimeError("a peer process exited without reporting") from None
    if "error" in message:
        raise RuntimeError(f"a peer failed:\n{message['error']}")
    return message


def kill_if_p2pd(pid: int) -> None:
    """SIGKILL ``pid`` if it is still a p2pd (ours: its peer died before stopping it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            is_daemon = os.path.basename(f.read().split(b"\0")[0]) == b"p2pd"
        if is_daemon:
            os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


def measure(n_peers: int, phase_bytes: int, repeats: int) -> dict[str, Any]:
    """Run the peers; return each round's reports (warm-up first), one dict per peer."""
    context = multiprocessing.get_context("spawn")
    processes: list[multiprocessing.process.BaseProcess] = []
    conns: list[Connection] = []
    daemon_pids: list[int] = []
    try:
        for _ in range(n_peers):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=peer_process, args=(child_end, n_peers, phase_bytes), daemon=True)
            process.start()
            child_end.close()
            processes.append(process)
            conns.append(parent_end)
        infos = [receive(conn, SETUP_TIMEOUT_S) for conn in conns]
        daemon_pids = [info["daemon_pid"] for info in infos]
        for conn in conns:
            conn.send([{"peer_id": info["peer_id"], "maddrs": info["maddrs"]} for info in infos])
        for conn in conns:
            receive(conn, SETUP_TIMEOUT_S)  # ready: connected, all streams open
        rounds = []
        for _ in range(1 + repeats):
            for conn in conns:  # every peer has reported ready (or its previous round): release all
                conn.send("go")
            rounds.append([receive(conn, ROUND_TIMEOUT_S) for conn in conns])
        for conn in conns:
            conn.send("stop")
        for process in processes:
            process.join(SETUP_TIMEOUT_S)
        return {"rounds": rounds, "exit_codes": [process.exitcode for process in processes]}
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
        for pid in daemon_pids:  # each dies with its peer (PR_SET_PDEATHSIG); make sure
            kill_if_p2pd(pid)
        for conn in conns:
            conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4, help="peer processes, each with its own p2pd")
    parser.add_argument("--phase-mb", type=float, default=25.0, help="MB (10^6 bytes) to each other peer per phase")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    args = parser.parse_args()
    if args.peers < 2 or args.repeats < 1 or args.phase_mb <= 0:
        parser.error("need --peers >= 2, --repeats >= 1, --phase-mb > 0")
    phase_bytes = round(args.phase_mb * MB)
    sent_per_peer = PHASES * (args.peers - 1) * phase_bytes
    setup = {
        "peers": args.peers,
        "phase_mb": args.phase_mb,
        "phases": PHASES,
        "message_mib": MESSAGE_BYTES / MiB,
        "repeats": args.repeats,
        "mb_out_per_peer": sent_per_peer / MB,
        "mb_total": args.peers * sent_per_peer / MB,
        "loop": "uvloop",
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }

    result = measure(args.peers, phase_bytes, args.repeats)
    timed = result["rounds"][1:]
    samples = [max(report["seconds"] for report in reports) for reports in timed]
    median = statistics.median(samples)

    def per_round(key: str) -> list[float]:
        return [round(sum(reports[i][key] for reports in timed) / len(timed), 3) for i in range(args.peers)]

    output = {
        "setup": setup,
        "seconds": round(median, 4),
        "samples": [round(s, 4) for s in samples],
        "warmup_seconds": round(max(report["seconds"] for report in result["rounds"][0]), 4),
        "gb_per_s": round(args.peers * sent_per_peer / median / 1e9, 3),
        "cpu_per_round": {"python": per_round("cpu_python"), "p2pd": per_round("cpu_p2pd")},
    }
    print(json.dumps(output))
    if any(code != 0 for code in result["exit_codes"]):
        sys.exit(f"peer processes exited with {result['exit_codes']}")


if __name__ == "__main__":
    main()
