"""``legion-swarm``: bootstrap | join | status | simulate.

Exit codes: 0 success; 1 the network failed us (unreachable peers, a timeout); 2 bad input (flags, files,
names, a taken port, a swarm mismatch); 130 interrupted. Errors are one line; ``--debug`` adds tracebacks.
Heavy imports (hivemind, torch) happen only after the arguments parse, so mistakes fail fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import NoReturn

from legion_swarm import __version__
from legion_swarm.cli.train import add_spec_flags
from legion_swarm.config import DEFAULT_BOOTSTRAP_PORT, DEFAULT_SWARM, validate_multiaddr, validate_swarm_name
from legion_swarm.errors import ConfigError, LegionError

logger = logging.getLogger("legion_swarm.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _DeprecatedAlias(argparse.Action):
    """Stores the value like a plain option, warning when it came by a deprecated name (every name after the
    first: ``--steps`` for ``--rounds``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string is not None and option_string != self.option_strings[0]:
            logger.warning("%s is deprecated: use %s", option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


def _checked(validate, what: str):
    def convert(text: str):
        try:
            return validate(text)
        except (ConfigError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e) or f"bad {what}: {text!r}") from None

    convert.__name__ = what
    return convert


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"bad port {text!r}: expected 0-65535")
    return int(text)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


def _seconds(p: argparse.ArgumentParser, flag: str, default: float | None, help: str, *, zero_ok: bool = False) -> None:
    check = _checked(_non_negative_float if zero_ok else _positive_float, "seconds")
    p.add_argument(flag, metavar="SECONDS", type=check, default=default, help=help)


def _peer_flag(p: argparse.ArgumentParser, help: str, *, required: bool) -> None:
    p.add_argument("--peer", metavar="MADDR", action="append", required=required, type=_dial_maddr, help=help)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return int(text)


def _nice(text: str) -> int:
    if not text.isdigit() or int(text) > 19:
        raise ValueError(f"expected 0-19, got {text!r}")
    return int(text)


def _metrics_port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"expected a port in 1-65535, got {text!r}")
    return int(text)


def _device(text: str) -> str:
    if text.strip().lower() in ("auto", "cpu"):
        return text.strip().lower()  # always valid: no torch import while the arguments parse
    from legion_swarm.train.device import check_device_name

    return check_device_name(text)  # ConfigError naming what this machine has


def _precision(text: str) -> str:
    from legion_swarm.train.device import check_precision

    return check_precision(text)


def _speed(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _speeds(text: str) -> list[float]:
    return [_speed(t) for t in text.split(",")]


def _placement_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", type=_checked(_device, "device"), default="auto",
        help="where to train: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--precision", type=_checked(_precision, "precision"), default="fp32",
        help="of forward/backward passes: fp32, bf16 or fp16 (autocast; float32 master weights; default: fp32)",
    )  # fmt: skip


def _netsim_file(text: str) -> str:
    from legion_swarm.transport.netsim import NetSim  # stdlib only: no hivemind before the arguments parse

    NetSim.load(text)  # ConfigError naming the file and the problem
    return text


def _peers_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise ValueError(f"bad peer count {text!r}: expected 1-64")
    return int(text)


_dial_maddr = _checked(lambda t: validate_multiaddr(t, require_peer_id=True, allow_port_zero=False), "multiaddr")
_announce_maddr = _checked(lambda t: validate_multiaddr(t, require_peer_id=False, allow_port_zero=False), "multiaddr")
_swarm_name = _checked(validate_swarm_name, "swarm name")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="legion-swarm", description="Train language models together across the internet.")
    parser.add_argument("--version", action="version", version=f"legion-swarm {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="verbose logs and full tracebacks")
    common.add_argument("--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def listening(p: argparse.ArgumentParser, default_port: int) -> None:
        p.add_argument("--host", default="0.0.0.0", help="IP address to listen on (default: %(default)s)")
        p.add_argument(
            "--port",
            type=_checked(_port, "port"),
            default=default_port,
            help="TCP port to listen on, 0 for any free port (default: %(default)s)",
        )
        p.add_argument(
            "--data-port",
            type=_checked(_port, "port"),
            default=0,
            help="TCP port of the direct data plane for tensors, 0 for any free port (default: %(default)s)",
        )
        p.add_argument(
            "--identity",
            metavar="PATH",
            help="private key file: same file, same peer id "
            "(created with mode 0600 if missing; default: a new key each run)",
        )
        p.add_argument(
            "--announce",
            metavar="MADDR",
            action="append",
            type=_announce_maddr,
            help="address others should dial, e.g. /ip4/PUBLIC_IP/tcp/PORT behind NAT (repeatable)",
        )
        p.add_argument("--upnp", action="store_true", help="ask the router for a port mapping (UPnP/NAT-PMP)")
        p.add_argument(
            "--netsim",
            metavar="PATH",
            type=_checked(_netsim_file, "netsim file"),
            help="for testing: inject per-peer-pair latency/bandwidth from a JSON file into this peer's traffic",
        )
        _seconds(p, "--heartbeat", 5.0, "seconds between record refreshes; a dead peer vanishes in ~3 (default: 5)")
        _seconds(p, "--report-every", 30.0, "log the swarm size this often (default: 30)")
        _seconds(p, "--probe-interval", 10.0, "seconds between RTT probe rounds (a few pings each; default: 10)")
        p.add_argument(
            "--metrics-port", metavar="N", type=_checked(_metrics_port, "port"),
            help="serve Prometheus metrics on http://HOST:N/metrics (default: off)",
        )  # fmt: skip

    p = sub.add_parser("bootstrap", parents=[common], help="run a stable entry node for a swarm")
    p.add_argument("--swarm", type=_swarm_name, default=DEFAULT_SWARM, help="swarm name (default: %(default)s)")
    _peer_flag(p, "another bootstrap node or member to link up with (repeatable; default: new swarm)", required=False)
    listening(p, DEFAULT_BOOTSTRAP_PORT)
    add_spec_flags(p, creator=True)

    p = sub.add_parser("join", parents=[common], help="join a swarm through any of its peers")
    _peer_flag(p, "full multiaddr of a swarm member, /ip4/A/tcp/P/p2p/ID (repeatable)", required=True)
    p.add_argument(
        "--swarm", type=_swarm_name,
        help="swarm to join (default: the entry peer's swarm; required through a plain hivemind DHT node)",
    )  # fmt: skip
    listening(p, 0)
    add_spec_flags(p, creator=False)
    p.add_argument("--rounds", type=_checked(_positive_int, "count"), help="stop after training this many rounds")
    p.add_argument("--no-train", action="store_true", help="be a member (DHT, data plane) without training")
    p.add_argument(
        "--resume", metavar="CKPT",
        help="start from a checkpoint of this swarm (a file, or a --checkpoint-dir: its newest)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-dir", metavar="DIR",
        help="write the swarm's state to DIR/<swarm>-r<round>.safetensors every --checkpoint-every rounds",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", metavar="N", type=_checked(_positive_int, "count"), default=10,
        help="rounds between checkpoints (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-keep", metavar="K", type=_checked(_positive_int, "count"), default=3,
        help="newest checkpoints kept, older ones deleted (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--threads",
        type=_checked(_positive_int, "count"),
        help="torch threads for training (default: one per core; lower it when peers share a machine)",
    )
    p.add_argument(
        "--nice",
        type=_checked(_nice, "nice value"),
        default=10,
        help="CPU priority of the training compute, 0 (normal) to 19 (idle only); networking keeps normal "
        "priority (default: %(default)s)",
    )
    _placement_flags(p)
    p.add_argument(
        "--speed", type=_checked(_speed, "speed"), default=1.0,
        help="for experiments: throttle the compute to this fraction of its pace, in (0, 1] (default: 1)",
    )  # fmt: skip

    p = sub.add_parser("status", parents=[common], help="show a swarm's members (never joins as a member)")
    _peer_flag(p, "full multiaddr of a swarm member (repeatable)", required=True)
    p.add_argument(
        "--swarm", type=_swarm_name,
        help="swarm to show (default: the entry peer's swarm; required through a plain hivemind DHT node)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _seconds(p, "--watch", None, "refresh every SECONDS until Ctrl+C")

    p = sub.add_parser("checkpoint", parents=[common], help="export the swarm's current model to a file")
    p.add_argument("action", choices=["export"], help="export: assemble the model from the swarm's members")
    p.add_argument("out", metavar="OUT.safetensors", help="file to write (atomically)")
    _peer_flag(p, "full multiaddr of a swarm member (repeatable)", required=True)
    p.add_argument("--swarm", type=_swarm_name, help="swarm (default: the entry peer's swarm)")

    p = sub.add_parser("identity", parents=[common], help="print the peer id of a key file (created if missing)")
    p.add_argument("path", metavar="PATH", help="identity key file; created with mode 0600 if it does not exist")

    p = sub.add_parser("simulate", parents=[common], help="run a bootstrap and N peer processes on this machine")
    p.add_argument("--peers", type=_checked(_peers_count, "count"), default=3, help="peer processes (default: 3)")
    p.add_argument("--swarm", type=_swarm_name, default="local", help="swarm name (default: %(default)s)")
    _seconds(p, "--heartbeat", 1.0, "peers' heartbeat (default: 1)")
    _seconds(p, "--duration", 0.0, "keep the swarm up this long after training (default: 0)", zero_ok=True)
    add_spec_flags(p, creator=True)
    p.add_argument(
        "--rounds",
        "--steps",  # its old name, before it took join's; still accepted, with a warning
        action=_DeprecatedAlias,
        type=_checked(_positive_int, "count"),
        default=12,
        help="rounds each peer trains "
        "(default: %(default)s; a round is one step in sync mode, --inner-steps steps in diloco)",
    )
    p.add_argument("--no-train", action="store_true", help="only form the swarm and show it")
    _placement_flags(p)
    p.add_argument(
        "--speeds", metavar="S1,S2,...", type=_checked(_speeds, "speeds"),
        help="unequal peers: throttle peer i's compute to S_i of its pace, e.g. 1,0.5,0.25 (default: all 1)",
    )  # fmt: skip
    # Any of these turns latency injection on (transport/netsim.py); peers are spread over regions in turn.
    p.add_argument(
        "--regions",
        metavar="N",
        type=_checked(_positive_int, "count"),
        help="spread the processes over N regions (default: 1)",
    )
    ms = _checked(_non_negative_float, "milliseconds")
    p.add_argument("--latency", metavar="MS", type=ms, help="RTT across regions (needs --regions > 1; default: 100)")
    p.add_argument("--intra-latency", metavar="MS", type=ms, help="RTT inside a region (default: 5 with netsim on)")
    _seconds(
        p, "--dropout", None, "churn: every ~SECONDS kill -9 a random training peer and restart it 5 s later "
        "as the same peer (default: off)",
    )  # fmt: skip
    p.add_argument(
        "--bandwidth",
        metavar="MBIT",
        type=_checked(_positive_float, "Mbit/s"),
        help="Mbit/s per direction per peer pair (default: unlimited)",
    )
    return parser


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=debug, rich_tracebacks=debug)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    os.environ.setdefault("GOLOG_LOG_LEVEL", "debug" if debug else "error")  # p2pd's own logs
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")  # hivemind's records flow through our handler
    logging.getLogger("hivemind").setLevel(logging.DEBUG if debug else logging.WARNING)


def _run(coro) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug
    try:
        if args.command == "identity":  # offline: no daemon, no hivemind import
            from legion_swarm.transport.identity import Identity

            print(Identity.load_or_create(args.path).peer_id)
            return 0
        setup_logging(debug, args.quiet)
        from legion_swarm.cli.commands import COMMANDS

        return _run(COMMANDS[args.command](args))
    except KeyboardInterrupt:
        return 130
    except (TimeoutError, ConfigError, LegionError) as e:
        if debug:
            logger.exception("%s failed", args.command)
        code = 2 if isinstance(e, ConfigError) else 1
        message = str(e) or "timed out"
        print(f"legion-swarm {args.command}: error: {message}", file=sys.stderr)
        return code
