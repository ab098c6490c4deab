"""Secure channel throughput on loopback against raw asyncio TCP (the anchors), measured in the same run.

Two processes, as two peers would be: this one receives, a child process (this script with ``--sender``)
sends. They hold three connections on 127.0.0.1, each moving ``--total-mib`` in ``--message-mib``
messages per timed transfer; the receiver starts the clock when it signals "go" (a message count) and
stops it at the last byte. One small untimed warm-up per mode, then the modes alternate ``--repeats``
times (medians reported), so all of them see the same machine load:

- ``raw_streams``: ``uint32 length + payload`` written with ``StreamWriter``, read with
  ``StreamReader.readexactly`` (what plain asyncio code does);
- ``raw_buffered``: the same bytes read by an ``asyncio.BufferedProtocol`` straight into a preallocated
  buffer: the ceiling for asyncio on TCP, and the anchor for the ratio;
- ``secure_recv_into``: ``SecureChannel.send`` → ``recv_into`` a preallocated buffer (the data-plane path);
- ``secure_recv``: the same sender → ``recv`` (returns bytes: one more copy for multi-record messages).

Also reported: AES-128-OCB3 (the record cipher) vs AES-256-OCB3, AES-128/256-GCM and ChaCha20-Poly1305
seal / open speed on 1 MiB records (one core, in process, ``encrypt_into`` / ``decrypt_into``), and the
handshake time seen by the initiator (both signatures, confirmation included).

    python benchmarks/bench_secure_channel.py                   # 256 MiB per transfer, 3 repeats
    python benchmarks/bench_secure_channel.py --total-mib 16 --repeats 1

Prints one JSON object. Goal: secure / raw throughput as close to 1 as the CPU allows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3, ChaCha20Poly1305

from legion_swarm.transport.identity import Identity
from legion_swarm.transport.record_layer import MAX_RECORD_PLAINTEXT
from legion_swarm.transport.secure import SecureChannel, secure_accept, secure_connect

HOST = "127.0.0.1"
MiB = 1 << 20
_LEN = struct.Struct(">I")


def run(coro: Any, loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def timed(fn: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def bench_ciphers(repeats: int = 30) -> dict[str, dict[str, float]]:
    """Seal / open GB/s of one 1 MiB record, median of ``repeats`` after a warm-up."""
    record = os.urandom(MAX_RECORD_PLAINTEXT)
    sealed, opened = bytearray(len(record) + 16), bytearray(len(record))
    out = {}
    ciphers = (("aes_128_ocb3", AESOCB3, 16), ("aes_256_ocb3", AESOCB3, 32), ("aes_128_gcm", AESGCM, 16),
               ("aes_256_gcm", AESGCM, 32), ("chacha20_poly1305", ChaCha20Poly1305, 32))  # fmt: skip
    for name, cls, key_bytes in ciphers:
        aead, nonce, aad = cls(os.urandom(key_bytes)), os.urandom(12), b"\x80\x10\x00\x10"
        seal_s = timed(lambda aead=aead, nonce=nonce, aad=aad: aead.encrypt_into(nonce, record, aad, sealed), repeats)
        open_s = timed(lambda aead=aead, nonce=nonce, aad=aad: aead.decrypt_into(nonce, sealed, aad, opened), repeats)
        out[name] = {"seal_gbps": gbps(len(record), seal_s), "open_gbps": gbps(len(record), open_s)}
    return out


# --------------------------------------------------------------------------------------------- sender


async def sender(ports: list[int], receiver_id: str, message_bytes: int) -> None:
    """Child process: on each "go" (a message count) from the receiver, send that many messages; 0 ends."""
    payload = os.urandom(message_bytes)
    identity = Identity.generate()
    raw = [await asyncio.open_connection(HOST, port) for port in ports[:2]]
    started = time.perf_counter()
    channel = await secure_connect(HOST, ports[2], identity, receiver_id, timeout=10)
    handshake_ms = (time.perf_counter() - started) * 1000

    async def serve_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = _LEN.pack(len(payload))
        while count := _LEN.unpack(await reader.readexactly(4))[0]:
            for _ in range(count):
                writer.write(header)
                writer.write(payload)
                await writer.drain()
        writer.close()

    async def serve_secure() -> None:
        while count := _LEN.unpack(await channel.recv(4))[0]:
            for _ in range(count):
                await channel.send(payload)
        await channel.aclose()

    await asyncio.gather(serve_secure(), *(serve_raw(r, w) for r, w in raw))
    sys.stdout.write(json.dumps({"handshake_ms": round(handshake_ms, 2)}) + "\n")


# ------------------------------------------------------------------------------------------- receiver


class BufferedReceiver(asyncio.BufferedProtocol):
    """Raw anchor at its best: length prefix, then the payload read straight into one preallocated buffer."""

    def __init__(self, message_bytes: int):
        self.header, self.body = memoryview(bytearray(4)), memoryview(bytearray(message_bytes))
        self.filled, self.in_body, self.left = 0, False, 0
        self.connected: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected.set_result(transport)  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> memoryview:
        return (self.body if self.in_body else self.header)[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if not self.in_body and self.filled == 4:
            assert _LEN.unpack(self.header)[0] == len(self.body)
            self.filled, self.in_body = 0, True
        elif self.in_body and self.filled == len(self.body):
            self.filled, self.in_body, self.left = 0, False, self.left - 1
            if not self.left and self.done is not None:
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("sender went away"))

    async def transfer(self, count: int) -> None:
        transport = await self.connected
        self.left, self.done = count, asyncio.get_running_loop().create_future()
        transport.write(_LEN.pack(count))
        await self.done


async def receiver(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    message_bytes = args.message_mib * MiB
    count = max(1, args.total_mib // args.message_mib)
    identity = Identity.generate()
    streams: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = loop.create_future()
    secure: asyncio.Future[SecureChannel] = loop.create_future()
    buffered = BufferedReceiver(message_bytes)

    async def on_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        streams.set_result((reader, writer))

    async def on_secure(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        secure.set_result(await secure_accept(reader, writer, identity, lambda _: True, timeout=10))

    servers = [
        await asyncio.start_server(on_streams, HOST, 0),
        await loop.create_server(lambda: buffered, HOST, 0),
        await asyncio.start_server(on_secure, HOST, 0),
    ]
    ports = [str(server.sockets[0].getsockname()[1]) for server in servers]
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--sender", "--loop", args.loop, "--message-mib", str(args.message_mib),
        *ports, identity.peer_id, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        reader, writer = await asyncio.wait_for(streams, 30)
        channel = await asyncio.wait_for(secure, 30)
        buffer = bytearray(message_bytes)

        async def raw_streams(count: int) -> None:
            writer.write(_LEN.pack(count))
            for _ in range(count):
                (n,) = _LEN.unpack(await reader.readexactly(4))
                assert len(await reader.readexactly(n)) == message_bytes

        async def secure_recv_into(count: int) -> None:
            await channel.send(_LEN.pack(count))
            for _ in range(count):
                assert await channel.recv_into(buffer) == message_bytes

        async def secure_recv(count: int) -> None:
            await channel.send(_LEN.pack(count))
            for _ in range(count):
                assert len(await channel.recv(message_bytes)) == message_bytes

        transfers: dict[str, Callable[[int], Awaitable[None]]] = {
            "raw_streams": raw_streams, "raw_buffered": buffered.transfer,
            "secure_recv_into": secure_recv_into, "secure_recv": secure_recv,
        }  # fmt: skip
        seconds: dict[str, list[float]] = {name: [] for name in transfers}
        for transfer in transfers.values():  # warm-up: first-touch page faults, socket buffer growth
            await transfer(min(count, 4))
        for _ in range(args.repeats):
            for name, transfer in transfers.items():
                started = time.perf_counter()
                await transfer(count)
                seconds[name].append(time.perf_counter() - started)
        writer.write(_LEN.pack(0))
        (await buffered.connected).write(_LEN.pack(0))
        await channel.send(_LEN.pack(0))
        out, _ = await asyncio.wait_for(child.communicate(), 30)
        await channel.aclose()
        writer.close()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        for server in servers:
            server.close()

    total = count * message_bytes
    result: dict[str, Any] = {name: gbps(total, statistics.median(s)) for name, s in seconds.items()}
    result["samples_gbps"] = {name: [gbps(total, x) for x in s] for name, s in seconds.items()}
    result.update(json.loads(out.decode().strip().splitlines()[-1]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mib", type=int, default=256, help="MiB moved per timed transfer")
    parser.add_argument("--message-mib", type=int, default=4, help="MiB per message")
    parser.add_argument("--repeats", type=int, default=3, help="timed transfers per mode (median reported)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (CLI: uvloop)")
    parser.add_argument("--sender", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("ports_and_peer", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        *ports, receiver_id = args.ports_and_peer
        run(sender([int(p) for p in ports], receiver_id, args.message_mib * MiB), args.loop)
        return

    ciphers = bench_ciphers()
    t = run(receiver(args), args.loop)
    report = {
        "setup": {
            "processes": "sender and receiver in two processes on 127.0.0.1 (one connection per mode)",
            "loop": args.loop,
            "total_mib": args.total_mib,
            "message_mib": args.message_mib,
            "repeats": args.repeats,
            "record_plaintext_bytes": MAX_RECORD_PLAINTEXT,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "raw_buffered_gbps": t["raw_buffered"],
        "raw_streams_gbps": t["raw_streams"],
        "secure_recv_into_gbps": t["secure_recv_into"],
        "secure_recv_gbps": t["secure_recv"],
        "ratio_secure_recv_into_to_raw_buffered": round(t["secure_recv_into"] / t["raw_buffered"], 3),
        "ratio_secure_recv_to_raw_buffered": round(t["secure_recv"] / t["raw_buffered"], 3),
        "ratio_secure_recv_into_to_raw_streams": round(t["secure_recv_into"] / t["raw_streams"], 3),
        "samples_gbps": t["samples_gbps"],
        "handshake_ms": t["handshake_ms"],
        "aead_1mib_records_one_core": ciphers,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
