"""The libp2p host: one ``p2pd`` daemon per process, driven through hivemind's asyncio ``P2P``.

Guarantees on top of ``P2P.create``:

- the daemon always runs with an identity we hold (so we can sign with the key behind our peer id);
  without ``identity_path`` a fresh key lives in a private temporary file only while the daemon starts;
- the daemon dies with this process even on SIGKILL (``PR_SET_PDEATHSIG``), never left as an orphan;
- TCP only (QUIC loses data in hivemind's streaming handlers: measured with hivemind 1.1.12's p2pd);
- daemon start-up failures become :mod:`legion_swarm.errors` exceptions with one-line messages;
- with ``HostConfig.netsim``, every stream it opens or accepts is delayed per :mod:`~legion_swarm.transport.netsim`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import raise_if_failed, read_pbmsg_safe, write_pbmsg
from hivemind.proto import p2pd_pb2
from hivemind.utils.multiaddr import Multiaddr

from legion_swarm.config import HostConfig
from legion_swarm.errors import AddressInUseError, NetworkError, PeerUnreachableError, UnsupportedProtocolError
from legion_swarm.transport.identity import Identity, decode_key_message, short_peer_id
from legion_swarm.transport.netsim import NetSim, Shaper

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the forked child, before exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # If the parent died between fork and prctl, nobody will send the signal: leave now.
    if os.getppid() == 1:
        os._exit(1)


# Daemons spawned inside the current Host.create call, so that a failed or cancelled start can reap them
# (hivemind's P2P.create leaves a half-started daemon to P2P.__del__, i.e. to the garbage collector).
_spawned: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("legion_spawned_p2pd", default=None)


def _install_pdeathsig_hook() -> None:
    """Make every ``p2pd`` that hivemind spawns die with us, and record it for :meth:`Host.create`.

    hivemind starts ``p2pd`` through ``asyncio.subprocess.create_subprocess_exec`` without a way to pass
    ``preexec_fn``; we wrap that function once, acting only on the ``p2pd`` executable. Without it a
    SIGKILLed peer leaves its daemon running for about two seconds, or longer if its pipes stay open.
    """
    current = asyncio.subprocess.create_subprocess_exec
    if getattr(current, "_legion_pdeathsig", False):
        return

    async def create_subprocess_exec(program: Any, *args: Any, **kwargs: Any) -> Any:
        is_daemon = os.path.basename(str(program)) == "p2pd"
        if is_daemon and "preexec_fn" not in kwargs:
            kwargs["preexec_fn"] = _die_with_parent
        process = await current(program, *args, **kwargs)
        spawned = _spawned.get()
        if is_daemon and spawned is not None:
            spawned.append(process)
        return process

    create_subprocess_exec._legion_pdeathsig = True  # type: ignore[attr-defined]
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec  # type: ignore[assignment]


async def _reap(processes: list[Any]) -> None:
    """Kill and wait for daemons of a start-up that did not complete (also when we are being cancelled)."""
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    for process in processes:
        # Shielded: a cancelled start must still wait for its daemon to be gone.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(process.wait())


def _translate(error: Exception, config: HostConfig) -> Exception:
    text = str(error)
    if "address already in use" in text:
        return AddressInUseError(f"cannot listen on {config.listen_maddr}: address already in use")
    if "bootstrap peers" in text:
        return PeerUnreachableError(f"none of the initial peers is reachable: {', '.join(config.initial_peers)}")
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return NetworkError(f"libp2p daemon failed: {first_line}")


class Host:
    """A running ``p2pd`` with our identity. Build with :meth:`create`, release with :meth:`aclose`."""

    def __init__(self, p2p: P2P, identity: Identity, config: HostConfig, netsim: NetSim | None = None):
        self.p2p = p2p
        self.identity = identity
        self.config = config
        self.peer_id: str = identity.peer_id
        self.netsim = netsim
        """Injected network conditions (``HostConfig.netsim``); ``None``: none, and no stream is wrapped."""
        self.shaper = Shaper(netsim, self.peer_id) if netsim is not None else None
        """Delays this peer's outgoing streams per :attr:`netsim` (shared with its data plane); ``None`` without."""
        self._closed = False

    @classmethod
    async def create(cls, config: HostConfig, identity: Identity | None = None) -> Host:
        """Start the daemon. ``identity`` defaults to the config's key file, or a fresh key."""
        _install_pdeathsig_hook()
        netsim = NetSim.load(config.netsim) if config.netsim is not None else None  # a bad file: before any daemon
        user_key_file = identity is None and config.identity_path is not None
        if identity is None:
            identity = Identity.load_or_create(config.identity_path) if config.identity_path else Identity.generate()
        with contextlib.ExitStack() as stack:
            if user_key_file:
                key_path = str(config.identity_path)
            else:
                key_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="legion-id-"))
                key_path = os.path.join(key_dir, "identity.key")
                identity.save(key_path)
            spawned: list[Any] = []
            token = _spawned.set(spawned)
            try:
                p2p = await P2P.create(
                    initial_peers=list(config.initial_peers) or None,
                    host_maddrs=[config.listen_maddr],
                    announce_maddrs=list(config.announce) or None,
                    identity_path=key_path,
                    dht_mode="client" if config.client_mode else "server",
                    startup_timeout=config.startup_timeout_s,
                    # A key held only by this process cannot be in use elsewhere; a user's key file can
                    # (the same file given to two peers), which hivemind detects by dialling it. Its check reads
                    # the file as an RSA key (libp2p key type 0) and raises on anything else, such as the Ed25519
                    # keys we create by default: those skip it.
                    check_if_identity_free=user_key_file and decode_key_message(identity.public_key)[0] == 0,
                    nat_port_map=config.upnp,
                )
            except BaseException as e:
                await _reap(spawned)
                if isinstance(e, P2PDaemonError):
                    raise _translate(e, config) from None
                raise
            finally:
                _spawned.reset(token)
        if p2p.peer_id.to_base58() != identity.peer_id:
            await p2p.shutdown()
            raise NetworkError("p2pd reports a different peer id than our identity file (corrupt key?)")
        host = cls(p2p, identity, config, netsim)
        logger.debug("[%s] p2pd started (pid %s)", host.short_id, host.daemon_pid)
        if netsim is not None:
            region = netsim.regions.get(host.peer_id)
            logger.info("[%s] netsim from %s: region %s", host.short_id, config.netsim, region or "none (no delay)")
        return host

    @property
    def short_id(self) -> str:
        return short_peer_id(self.peer_id)

    @property
    def daemon_pid(self) -> int | None:
        child = getattr(self.p2p, "_child", None)
        return child.pid if child is not None else None

    async def maddrs(self) -> list[str]:
        """Full, dialable multiaddrs of this peer (``/ip4/A/tcp/P/p2p/<id>``), announce addresses first."""
        visible = {str(m) for m in await self.p2p.get_visible_maddrs(latest=True)}
        announced = tuple(self.config.announce)
        return sorted(visible, key=lambda m: (not m.startswith(announced) if announced else False, m))

    async def connect(self, peer_id: str, maddrs: Sequence[str]) -> None:
        """Make the daemon connect to ``peer_id`` at known addresses (``/ip4/A/tcp/P``, with or without the
        trailing ``/p2p/<peer_id>``), so that streams can then be opened to it without a DHT lookup.

        Empty ``maddrs``: the daemon uses what it already knows. Raises :class:`PeerUnreachableError` if the
        daemon cannot connect (it tries every address; its dial timeout is its own, wrap this in
        ``asyncio.wait_for`` for a tighter one), ``ValueError`` for a malformed address or one of another peer.
        """
        target = PeerID.from_base58(peer_id)
        addresses = []
        for maddr in maddrs:
            head, p2p, last = maddr.rpartition("/p2p/")
            if p2p and "/" not in last:  # ends in /p2p/<id> (a relay's id is followed by /p2p-circuit)
                if last != peer_id:
                    raise ValueError(f"address {maddr} belongs to another peer than {peer_id}")
                maddr = head
            addresses.append(Multiaddr(maddr).to_bytes())  # raises ValueError if malformed
        request = p2pd_pb2.Request(
            type=p2pd_pb2.Request.CONNECT, connect=p2pd_pb2.ConnectRequest(peer=target.to_bytes(), addrs=addresses)
        )
        try:
            _, writer = await self.daemon_request(request)
        except (P2PDaemonError, asyncio.IncompleteReadError, ConnectionError) as e:
            reason = str(e).removeprefix("Connect failed. msg=") or repr(e)
            raise PeerUnreachableError(f"cannot connect to {short_peer_id(peer_id)}: {reason}") from None
        writer.transport.abort()  # the daemon answered: nothing more to flush

    async def daemon_request(self, request: p2pd_pb2.Request) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Send ``request`` to our ``p2pd`` on a connection of its own and check the response; return that
        connection, which the caller then owns (a ``STREAM_OPEN`` connection carries the stream).

        hivemind's client does the same, but leaves its daemon connection to the garbage collector when the request
        fails or is cancelled, and the daemon may then still act on it. Here it is aborted at once. Raises
        :class:`NetworkError` if the daemon is not there, ``P2PDaemonError`` if it refuses the request,
        ``asyncio.IncompleteReadError`` / ``ConnectionError`` if the connection breaks.
        """
        connector: Any = self.p2p._client.control.daemon_connector  # type: ignore[union-attr]
        try:
            reader, writer = await connector.open_connection()
        except OSError as e:
            raise NetworkError(f"cannot reach our own p2pd (host closed?): {e!r}") from None
        try:
            await write_pbmsg(writer, request)
            response = p2pd_pb2.Response()
            await read_pbmsg_safe(reader, response)
            raise_if_failed(response)
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer

    async def add_stream_handler(self, name: str, handler: Callable[..., Any]) -> None:
        """Serve ``name``: ``handler(stream_info, reader, writer)`` runs for every stream a peer opens to it."""
        shaper = self.shaper
        if shaper is not None:
            serve = handler

            async def handler(stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await serve(stream_info, reader, shaper.wrap(writer, stream_info.peer_id.to_base58()))

        await self.p2p.add_binary_stream_handler(name, handler)

    async def open_stream(self, peer_id: str, protocol: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream to ``peer_id`` speaking ``protocol``: :class:`PeerUnreachableError` if it cannot be
        dialled, :class:`UnsupportedProtocolError` (a :class:`ProtocolError`) if it does not serve ``protocol``.

        hivemind's ``stream_open``, but closing its daemon connection when it fails or is cancelled (hivemind's
        leaves it to the garbage collector, and the daemon may still open the stream to the peer)."""
        request = p2pd_pb2.Request(
            type=p2pd_pb2.Request.STREAM_OPEN,
            streamOpen=p2pd_pb2.StreamOpenRequest(peer=PeerID.from_base58(peer_id).to_bytes(), proto=[protocol]),
        )
        try:
            reader, writer = await self.daemon_request(request)
        except P2PDaemonError as e:
            reason = str(e).removeprefix("Connect failed. msg=")
            failure = f"cannot open {protocol} to {short_peer_id(peer_id)}: {reason}"
            if "protocols not supported" in reason:  # reached, but it does not serve this protocol
                raise UnsupportedProtocolError(failure) from None
            raise PeerUnreachableError(failure) from None
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise PeerUnreachableError(f"p2pd connection failed while opening {protocol}: {e!r}") from None
        if self.shaper is not None:
            writer = self.shaper.wrap(writer, peer_id)
        return reader, writer

    async def aclose(self) -> None:
        """Stop the daemon and wait for it to exit (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.p2p.shutdown()
        finally:
            _collect_control_task_errors(self.p2p)
        logger.debug("[%s] p2pd stopped", self.short_id)

    async def __aenter__(self) -> Host:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _collect_control_task_errors(p2p: P2P) -> None:
    """Retrieve the errors of hivemind's daemon-connection tasks that died as the daemon closed.

    ``ControlClient.close`` cancels only tasks still running; one that already failed with
    ``ConnectionResetError`` at shutdown would otherwise print "Task exception was never retrieved".
    """
    control = getattr(getattr(p2p, "_client", None), "control", None)
    for name in ("_read_task", "_write_task"):
        task = getattr(control, name, None)
        if isinstance(task, asyncio.Task) and task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                logger.debug("daemon connection task %s ended with %r at shutdown", name, error)


class _DropShutdownNoise(logging.Filter):
    """p2pd logs an error when its control socket closes under it, which is how every shutdown goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "use of closed network connection" not in record.getMessage()


logging.getLogger("hivemind.p2p.p2p_daemon").addFilter(_DropShutdownNoise())
