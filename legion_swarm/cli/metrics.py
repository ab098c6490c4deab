"""Prometheus metrics of one node (``bootstrap`` / ``join`` with ``--metrics-port N``).

A :class:`MetricsServer` serves ``http://HOST:N/metrics`` from a thread (``prometheus_client``'s WSGI server) and
reads the node's live state at every scrape, so nothing in the training loop counts twice: the trainer's
:class:`~legion_swarm.train.loop.Progress` (rounds, steps, loss, tokens/s, bytes, re-syncs, samples, the seconds
spent in each round phase) and the number of members the node saw at its last look at the DHT (refreshed every
``refresh_s`` on the event loop; the scrape thread never touches the network). ``status --json`` stays the view of
the whole swarm; these are one node's numbers, for a Prometheus scraping every node (``docker/compose.yaml``'s
``metrics`` profile).

Every metric is named ``legion_...`` and labelled with the node's ``swarm``, ``peer`` (its short id) and ``role``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from legion_swarm.errors import ConfigError

logger = logging.getLogger(__name__)

_COUNTERS = (
    # name, Progress field, help
    ("rounds_committed", "rounds_committed", "Rounds this node committed since it started."),
    ("rounds_failed", "rounds_failed", "Round attempts that committed nothing (no group, or every shard lost)."),
    ("resyncs", "resyncs", "State downloads from donors (joining, late, or declared faulty)."),
    ("bytes_sent", "bytes_sent", "Collective payload bytes this node sent."),
    ("bytes_received", "bytes_received", "Collective payload bytes this node received."),
    ("samples", "samples", "Samples of local work that went into committed rounds."),
    ("samples_dropped", "samples_dropped", "Samples of local work thrown away (stale after a re-sync)."),
    ("compute_seconds", "compute_s", "Seconds spent in local steps (forward, backward, inner optimizer)."),
)
_GAUGES = (
    ("round", "round", "The round whose state this node holds."),
    ("step", "step", "Local steps taken since the node started."),
    ("loss", "loss", "Training loss of the last round's local work."),
    ("val_loss", "val_loss", "Validation loss at the last evaluation."),
    ("tokens_per_s", "tokens_per_s", "Tokens of local work per second of training."),
    ("samples_per_s", "samples_per_s", "Samples per second of local steps (compute only)."),
    ("bandwidth_mb_s", "bandwidth", "Measured data-plane throughput, MB/s, as announced."),
    ("group_size", "group_size", "Members of this node's group in its last round."),
)


class NodeCollector(Collector):
    """The node's numbers, read at scrape time (see the module docstring)."""

    def __init__(self, swarm: str, peer: str, role: str) -> None:
        self.labels = {"swarm": swarm, "peer": peer, "role": role}
        self.trainer: Any = None
        """The node's :class:`~legion_swarm.train.loop.SwarmTrainer` once it trains (None: not training)."""
        self.peers_seen: int | None = None

    def collect(self) -> Iterator[Metric]:
        names, values = list(self.labels), list(self.labels.values())

        def gauge(name: str, help_: str, value: float | None) -> Iterator[Metric]:
            if value is not None:
                family = GaugeMetricFamily(f"legion_{name}", help_, labels=names)
                family.add_metric(values, float(value))
                yield family

        yield from gauge("peers_seen", "Members of the swarm this node saw at its last look at the DHT.",
                         self.peers_seen)  # fmt: skip
        trainer = self.trainer
        if trainer is None:
            return
        progress = trainer.progress
        for name, attr, help_ in _COUNTERS:
            family = CounterMetricFamily(f"legion_{name}", help_, labels=names)
            family.add_metric(values, float(getattr(progress, attr)))
            yield family
        for name, attr, help_ in _GAUGES:
            yield from gauge(name, help_, getattr(progress, attr))
        download = progress.download
        yield from gauge("state_download_bytes", "Bytes of the state download in progress (0: none).",
                         0 if download is None else download[0])  # fmt: skip
        phases = CounterMetricFamily(
            "legion_phase_seconds", "Seconds spent in each phase of the training rounds.", labels=[*names, "phase"]
        )
        for phase, seconds in sorted(trainer.phase_seconds.items()):
            phases.add_metric([*values, phase], seconds)
        yield phases


class MetricsServer:
    """``/metrics`` on ``host:port`` for one node; :meth:`start` binds (a port in use is a :class:`ConfigError`)."""

    def __init__(self, port: int, *, host: str = "0.0.0.0", refresh_s: float = 5.0) -> None:
        if not 0 < port <= 65535:
            raise ConfigError(f"bad metrics port {port}: expected 1-65535")
        self.port, self.host, self.refresh_s = port, host, refresh_s
        self.collector: NodeCollector | None = None
        self._server: Any = None
        self._refresh: asyncio.Task[None] | None = None
        self._registry = CollectorRegistry(auto_describe=False)

    def start(self) -> None:
        """Bind and serve from a thread (before the node starts: a bad port fails before any daemon does)."""
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(self.port, addr=self.host, registry=self._registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"metrics port {self.port} is in use") from None
            raise ConfigError(f"cannot serve metrics on {self.host}:{self.port}: {e.strerror or e}") from None
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def attach(self, peer: Any, role: str) -> NodeCollector:
        """Report ``peer``'s numbers (a :class:`~legion_swarm.peer.SwarmPeer`); its view is refreshed on the event
        loop every ``refresh_s``."""
        self.collector = NodeCollector(peer.swarm, peer.tag, role)
        self._registry.register(self.collector)
        self._refresh = asyncio.create_task(self._refresh_view(peer, self.collector))
        return self.collector

    async def _refresh_view(self, peer: Any, collector: NodeCollector) -> None:
        while True:
            try:
                collector.peers_seen = len((await asyncio.wait_for(peer.view(), 10)).members)
            except Exception as e:  # metrics are a report: say why and go on
                logger.debug("metrics: could not read the swarm: %r", e)
            await asyncio.sleep(self.refresh_s)

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()
            self._server = None
