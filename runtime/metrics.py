"""Prometheus metrics through the official client library, ``prometheus_client``.

Each daemon owns one :class:`~prometheus_client.CollectorRegistry` made by :func:`new_registry`,
which already carries the library's process, platform and garbage-collector collectors. Numbers
the daemon counts itself go into the library's ``Counter``, ``Gauge`` and ``Histogram`` bound
to that registry; numbers already counted elsewhere (the frame intake, the outbox) are read
from their owner when scraped, by a collector of the owner's (a class with ``collect()``
yielding ``*MetricFamily`` objects), so nothing is counted twice. :class:`MetricsServer` serves
the registry with the library's own HTTP server, in text format 0.0.4 (or OpenMetrics when the
scraper asks for it).
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from protocol.errors import ConfigError

__all__ = ["METRICS_PATH", "MetricsServer", "new_registry"]

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - a scrape target must be reachable by the scraper
SERVER_JOIN_TIMEOUT_S = 5.0


def new_registry() -> CollectorRegistry:
    """A registry with the process (CPU, memory, file descriptors), Python platform and
    garbage-collector metrics that every Prometheus client exports.

    Not the library's global default registry: tests run several daemons in one process, and
    each must show only its own metrics.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsServer:
    """Serves ``registry`` at ``http://<host>:<port>/metrics``; port 0 lets the kernel pick.

    The library's server answers on every path (``/`` too), as Prometheus exporters do.
    """

    def __init__(self, registry: CollectorRegistry, *, port: int, host: str = ALL_INTERFACES):
        self.registry = registry
        self.host = host
        self._requested_port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_port)

    def start(self) -> None:
        if self._server is not None:
            return
        try:
            self._server, self._thread = start_http_server(
                self._requested_port, addr=self.host, registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.host}:{self._requested_port}: {exc}",
                reason="metrics_port",
            ) from exc
        logger.info("metrics at http://%s:%d%s", self.host, self.port, METRICS_PATH)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(SERVER_JOIN_TIMEOUT_S)
        self._server = None
        self._thread = None
