"""State sync: a peer that is new, returning or out of step downloads the swarm's state from donors.

Every training peer serves ``legion/state/1`` on its libp2p host (:class:`StateServer`). A request is one
msgpack map, the answer a msgpack header followed by raw little-endian float32 bytes:

- ``{"what": "meta"}`` → round, state id, the SHA-256 of the flat parameters, their element count, and who
  owns which range of the sharded optimizer state;
- ``{"what": "params", "state_id", "start", "end"}`` → flat parameters ``[start, end)``;
- ``{"what": "optim", "state_id", "start", "end"}`` → the optimizer state of ``[start, end)`` if this peer
  owns it (buffers in name order, plus the step segments).

A download asks every donor for its meta, keeps the state most donors agree on, fetches disjoint ranges from
all of them in parallel, and checks the SHA-256 of the assembled vector: a donor that moved on to the next
round mid-download or sent wrong bytes is caught, and the download is retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from legion_swarm.errors import LegionError, ProtocolError, TrainingError
from legion_swarm.train.optim import StateSlice
from legion_swarm.transport.framing import read_message, write_message
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import short_peer_id

logger = logging.getLogger(__name__)

STATE_PROTOCOL = "legion/state/1"
RANGE_ELEMS = 1 << 22
"""Largest range one request fetches (16 MiB of float32): ranges spread over donors at this granularity."""


@dataclass(frozen=True)
class StateMeta:
    round: int
    state_id: bytes
    sha256: bytes
    numel: int
    owners: tuple[tuple[str, int, int], ...]
    """``(peer_id, start, end)``: who holds the optimizer state of which flat range, as of ``round``."""


class StateSource:
    """What a donor holds; the trainer implements it."""

    def describe(self) -> tuple[int, bytes, tuple[tuple[str, int, int], ...]]:
        """``(round, state_id, owners)`` of the state held now."""
        raise NotImplementedError

    def flat_copy(self) -> np.ndarray:
        """A float32 copy of the whole flat state held now."""
        raise NotImplementedError

    def optim_range(self, start: int, end: int) -> StateSlice | None:
        """This peer's optimizer state of ``[start, end)`` (as of the state held now), or None."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Snapshot:
    meta: StateMeta
    flat: np.ndarray


class StateServer:
    """Serves ``STATE_PROTOCOL`` from a :class:`StateSource`.

    A ``meta`` request snapshots the flat state (a copy, hashed once), and ranges are served from the snapshot
    of the state id they name: a download stays consistent while the donor trains on, for as long as the
    donor keeps that snapshot (the two latest). Optimizer state is not snapshotted: an owner answers for the
    state it holds now, or says it has moved on.
    """

    KEEP = 2

    def __init__(self, host: Host, source: StateSource) -> None:
        self.host, self.source = host, source
        self._snapshots: dict[bytes, _Snapshot] = {}

    async def start(self) -> None:
        await self.host.add_stream_handler(STATE_PROTOCOL, self._handle)

    def snapshot(self) -> _Snapshot:
        round_, state_id, owners = self.source.describe()
        snap = self._snapshots.get(state_id)
        if snap is None:
            flat = self.source.flat_copy()
            sha = hashlib.sha256(memoryview(flat).cast("B")).digest()
            snap = _Snapshot(StateMeta(round_, state_id, sha, flat.size, owners), flat)
            self._snapshots[state_id] = snap
            while len(self._snapshots) > self.KEEP:
                self._snapshots.pop(next(iter(self._snapshots)))
        return snap

    async def _handle(self, stream_info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(read_message(reader, max_bytes=4096), 10)
            if not isinstance(request, dict):
                raise ProtocolError("state request is not a map")
            await self._answer(request, writer)
        except (TimeoutError, ProtocolError, ConnectionError) as e:
            logger.info("[%s] bad state request from %s: %r", self.host.short_id, stream_info, e)
        finally:
            writer.close()

    async def _answer(self, request: dict[str, object], writer: asyncio.StreamWriter) -> None:
        what = request.get("what")
        if what == "meta":
            meta = self.snapshot().meta
            await write_message(writer, {
                "round": meta.round, "state_id": meta.state_id, "sha256": meta.sha256, "numel": meta.numel,
                "owners": [list(o) for o in meta.owners],
            })  # fmt: skip
            return
        start, end = request.get("start"), request.get("end")
        if not (type(start) is int and type(end) is int and 0 <= start <= end and end - start <= RANGE_ELEMS):
            raise ProtocolError(f"bad range {start!r}..{end!r}")
        state_id = request.get("state_id")
        if what == "params":
            snap = self._snapshots.get(state_id) if isinstance(state_id, bytes) else None
            if snap is None:
                await write_message(writer, {"status": "moved"})
                return
            if end > snap.flat.size:
                raise ProtocolError(f"range end {end} past {snap.flat.size} elements")
            data = snap.flat[start:end]
            await write_message(writer, {"status": "ok", "nbytes": data.nbytes})
            writer.write(memoryview(data).cast("B"))
            await writer.drain()
        elif what == "optim":
            got = self.source.optim_range(start, end) if state_id == self.source.describe()[1] else None
            if got is None:
                await write_message(writer, {"status": "missing"})
                return
            names = sorted(got.buffers)
            arrays = [got.buffers[n].numpy().astype(np.float32, copy=True) for n in names]  # copied before yielding
            header = {"status": "ok", "names": names, "segments": [list(s) for s in got.segments]}
            await write_message(writer, {**header, "nbytes": sum(a.nbytes for a in arrays)})
            for a in arrays:
                writer.write(memoryview(a).cast("B"))
            await writer.drain()
        else:
            raise ProtocolError(f"unknown state request {what!r}")


async def _request(host: Host, peer_id: str, request: dict[str, object], timeout: float) -> tuple[dict, bytes]:
    async with asyncio.timeout(timeout):
        reader, writer = await host.open_stream(peer_id, STATE_PROTOCOL)
        try:
            await write_message(writer, request)
            header = await read_message(reader)
            if not isinstance(header, dict):
                raise ProtocolError("state answer is not a map")
            nbytes = header.get("nbytes", 0)
            if type(nbytes) is not int or not 0 <= nbytes <= 8 * RANGE_ELEMS:
                raise ProtocolError(f"bad payload size {nbytes!r}")
            payload = await reader.readexactly(nbytes) if nbytes else b""
        finally:
            writer.close()
    return header, payload


async def fetch_meta(host: Host, peer_id: str, timeout: float = 10.0) -> StateMeta:
    header, _ = await _request(host, peer_id, {"what": "meta"}, timeout)
    try:
        owners = tuple((str(p), int(a), int(b)) for p, a, b in header["owners"])
        return StateMeta(int(header["round"]), bytes(header["state_id"]), bytes(header["sha256"]),
                         int(header["numel"]), owners)  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"malformed state meta: {e!r}") from None


@dataclass(frozen=True)
class Downloaded:
    meta: StateMeta
    flat: torch.Tensor
    donors: tuple[str, ...]
    seconds: float


Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``."""


async def download_state(
    host: Host, donors: list[str], *, numel: int, timeout: float = 60.0, progress: Progress | None = None,
    attempts: int = 3,
) -> Downloaded:  # fmt: skip
    """The swarm's current flat state from ``donors``, in parallel, verified by SHA-256."""
    last_error: Exception | None = None
    for _ in range(attempts):
        try:
            return await _download_once(host, donors, numel=numel, timeout=timeout, progress=progress)
        except (ProtocolError, TrainingError, TimeoutError, OSError, EOFError) as e:  # EOF: a donor went away
            last_error = e
            logger.info("[%s] state download failed, retrying: %s", host.short_id, e)
    raise TrainingError(f"could not download the swarm's state from {len(donors)} donors: {last_error}")


async def _download_once(
    host: Host, donors: list[str], *, numel: int, timeout: float, progress: Progress | None
) -> Downloaded:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    metas = await asyncio.gather(*(fetch_meta(host, d, timeout=10.0) for d in donors), return_exceptions=True)
    good = {d: m for d, m in zip(donors, metas, strict=True) if isinstance(m, StateMeta) and m.numel == numel}
    if not good:
        raise TrainingError(f"no donor answered with a state of {numel} elements: {metas!r}")
    # The latest round most donors agree on.
    counts = Counter((m.round, m.state_id, m.sha256) for m in good.values())
    (round_, state_id, sha), _ = max(counts.items(), key=lambda item: (item[0][0], item[1]))
    chosen = [d for d, m in good.items() if (m.round, m.state_id, m.sha256) == (round_, state_id, sha)]
    meta = good[chosen[0]]
    flat = np.empty(numel, dtype=np.float32)
    ranges = [(a, min(a + RANGE_ELEMS, numel)) for a in range(0, numel, RANGE_ELEMS)] or [(0, 0)]
    done = 0

    async def fetch(i: int, start: int, end: int) -> None:
        nonlocal done
        for k in range(len(chosen)):  # round-robin over donors, falling back to the next one
            donor = chosen[(i + k) % len(chosen)]
            try:
                request = {"what": "params", "state_id": state_id, "start": start, "end": end}
                header, payload = await _request(host, donor, request, timeout)
                if header.get("status") != "ok" or len(payload) != 4 * (end - start):
                    raise ProtocolError(f"donor answered {header.get('status')!r} with {len(payload)} bytes")
                flat[start:end] = np.frombuffer(payload, dtype=np.float32)
                done += len(payload)
                if progress is not None:
                    progress(done, 4 * numel)
                return
            except (ProtocolError, TimeoutError, OSError, EOFError, LegionError) as e:  # EOF: the donor went away
                logger.info("[%s] range %d..%d from %s failed: %s", host.short_id, start, end, short_peer_id(donor), e)
        raise TrainingError(f"no donor served range {start}..{end}")

    results = await asyncio.gather(*(fetch(i, a, b) for i, (a, b) in enumerate(ranges)), return_exceptions=True)
    for error in results:
        if isinstance(error, BaseException):
            raise error
    if hashlib.sha256(memoryview(flat).cast("B")).digest() != sha:
        raise ProtocolError("the downloaded state does not match its SHA-256 (a donor moved on or lied)")
    seconds = loop.time() - t0
    logger.info(
        "[%s] downloaded round %d (%.1f MB) from %d donors in %.2f s", host.short_id, round_, flat.nbytes / 1e6,
        len(chosen), seconds,
    )  # fmt: skip
    return Downloaded(meta, torch.from_numpy(flat), tuple(chosen), seconds)


async def fetch_optimizer_state(
    host: Host, owners: tuple[tuple[str, int, int], ...], state_id: bytes, start: int, end: int, *,
    buffer_names: tuple[str, ...], timeout: float = 30.0,
) -> dict[tuple[int, int], StateSlice]:  # fmt: skip
    """The optimizer state of ``[start, end)`` from the owners of overlapping ranges, by range; ranges whose
    owner does not answer are left out (that state starts fresh)."""
    overlaps = [(p, max(a, start), min(b, end)) for p, a, b in owners if p != host.peer_id]
    wanted = [(p, lo, hi) for p, lo, hi in overlaps if lo < hi]
    found: dict[tuple[int, int], StateSlice] = {}

    async def fetch(peer: str, lo: int, hi: int) -> None:
        for a in range(lo, hi, RANGE_ELEMS):
            b = min(a + RANGE_ELEMS, hi)
            try:
                request = {"what": "optim", "state_id": state_id, "start": a, "end": b}
                header, payload = await _request(host, peer, request, timeout)
                if header.get("status") != "ok" or tuple(header.get("names", ())) != tuple(sorted(buffer_names)):
                    return
                n = b - a
                if len(payload) != 4 * n * len(buffer_names):
                    raise ProtocolError("optimizer state of the wrong size")
                arrays = np.frombuffer(payload, dtype=np.float32).reshape(len(buffer_names), n)
                if not np.isfinite(arrays).all():
                    raise ProtocolError("non-finite optimizer state")
                buffers = {name: torch.from_numpy(arrays[i].copy()) for i, name in enumerate(header["names"])}
                segments = [(int(x), int(y), int(s)) for x, y, s in header["segments"]]
                if segments and (segments[0][0] != a or segments[-1][1] != b):
                    raise ProtocolError("optimizer state segments do not cover the range")
                found[(a, b)] = StateSlice(a, b, buffers, segments)
            except (ProtocolError, TimeoutError, OSError, EOFError, LegionError, ValueError, TypeError) as e:
                who = short_peer_id(peer)
                logger.warning("[%s] no optimizer state %d..%d from %s: %s", host.short_id, a, b, who, e)
                return

    await asyncio.gather(*(fetch(peer, lo, hi) for peer, lo, hi in wanted))  # fetch() logs and skips failures
    return found
