"""A small Prometheus registry: counters, gauges and histograms, rendered as text 0.0.4.

Values may be kept here (``inc``, ``set``, ``observe``) or read from the owner's own
state when scraped (``set_function``), so numbers already counted elsewhere are never
counted twice. :class:`MetricsServer` serves ``/metrics`` over HTTP from a daemon thread.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar, Generic, TypeVar

from protocol.errors import ConfigError

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS_S",
    "METRICS_PATH",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricsServer",
    "Registry",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - a scrape target must be reachable by the scraper
DEFAULT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SERVER_JOIN_TIMEOUT_S = 5.0

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RESERVED_LABELS = {"le", "quantile"}

Number = Callable[[], float]
Labels = tuple[tuple[str, str], ...]


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _sample(name: str, labels: Labels, value: float) -> str:
    if not labels:
        return f"{name} {_format_value(value)}"
    pairs = ",".join(f'{key}="{_escape_label(text)}"' for key, text in labels)
    return f"{name}{{{pairs}}} {_format_value(value)}"


class _Value:
    """One number, kept here or read from a function at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0
        self._function: Number | None = None

    def add(self, amount: float) -> None:
        with self._lock:
            self._value += amount

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def set_function(self, function: Number) -> None:
        with self._lock:
            self._function = function

    def get(self) -> float:
        with self._lock:
            function = self._function
            value = self._value
        return float(function()) if function is not None else value


class CounterChild:
    def __init__(self) -> None:
        self._value = _Value()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; got {amount}")
        self._value.add(amount)

    def set_function(self, function: Number) -> None:
        """Read the count from ``function`` (which must never decrease) at scrape time."""
        self._value.set_function(function)

    def get(self) -> float:
        return self._value.get()


class GaugeChild:
    def __init__(self) -> None:
        self._value = _Value()

    def set(self, value: float) -> None:
        self._value.set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._value.add(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._value.add(-amount)

    def set_function(self, function: Number) -> None:
        self._value.set_function(function)

    def get(self) -> float:
        return self._value.get()


class HistogramChild:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._lock = threading.Lock()
        self._counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        slot = next((i for i, bound in enumerate(self._bounds) if value <= bound), -1)
        with self._lock:
            self._counts[slot] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative (upper bound, count) pairs ending with +Inf, the sum and the count."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative, running = [], 0
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return cumulative, total, running


ChildT = TypeVar("ChildT", CounterChild, GaugeChild, HistogramChild)


class _Family(Generic[ChildT]):
    """A metric name with its label names and one child per label value combination."""

    kind: ClassVar[str]

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for {name}")
            if label in _RESERVED_LABELS:
                raise ValueError(f"label {label!r} is reserved ({name})")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}: {labelnames}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], ChildT] = {}

    def _new_child(self) -> ChildT:
        raise NotImplementedError

    def labels(self, *values: str, **named: str) -> ChildT:
        """The child for these label values, given in order or by name (not both)."""
        if values and named:
            raise ValueError("give label values in order or by name, not both")
        if named:
            if set(named) != set(self.labelnames):
                raise ValueError(f"{self.name} has labels {self.labelnames}, got {sorted(named)}")
            values = tuple(named[label] for label in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} has labels {self.labelnames}, got {len(values)} values")
        key = tuple(str(value) for value in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def label_values(self) -> list[tuple[str, ...]]:
        """The label value combinations that have a child, sorted."""
        with self._lock:
            return sorted(self._children)

    def clear(self) -> None:
        """Forget every child (for label values that no longer apply, like an old version)."""
        with self._lock:
            self._children.clear()

    def _unlabelled(self) -> ChildT:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self.labels()

    def _items(self) -> list[tuple[Labels, ChildT]]:
        with self._lock:
            children = sorted(self._children.items())
        return [(tuple(zip(self.labelnames, key, strict=True)), child) for key, child in children]

    def render(self) -> Iterator[str]:
        if not self.labelnames:
            self._unlabelled()  # a metric without labels shows its zero before any update
        yield f"# HELP {self.name} {_escape_help(self.documentation)}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, child in self._items():
            yield from self._samples(labels, child)

    def _samples(self, labels: Labels, child: ChildT) -> Iterator[str]:
        raise NotImplementedError


class Counter(_Family[CounterChild]):
    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter names end in _total: {name!r}")
        super().__init__(name, documentation, labelnames)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _samples(self, labels: Labels, child: CounterChild) -> Iterator[str]:
        yield _sample(self.name, labels, child.get())

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def set_function(self, function: Number) -> None:
        self._unlabelled().set_function(function)


class Gauge(_Family[GaugeChild]):
    kind = "gauge"

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def _samples(self, labels: Labels, child: GaugeChild) -> Iterator[str]:
        yield _sample(self.name, labels, child.get())

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._unlabelled().dec(amount)

    def set_function(self, function: Number) -> None:
        self._unlabelled().set_function(function)


class Histogram(_Family[HistogramChild]):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS_S,
    ) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"buckets of {name} must be strictly increasing: {buckets}")
        self.bounds = bounds

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def _samples(self, labels: Labels, child: HistogramChild) -> Iterator[str]:
        cumulative, total, count = child.snapshot()
        for bound, running in cumulative:
            yield _sample(f"{self.name}_bucket", (*labels, ("le", _format_value(bound))), running)
        yield _sample(f"{self.name}_sum", labels, total)
        yield _sample(f"{self.name}_count", labels, count)


class Registry:
    """Every metric of one process, rendered together; names are unique."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, Counter | Gauge | Histogram] = {}
        self._collectors: list[Callable[[], None]] = []

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        counter = Counter(name, documentation, labelnames)
        self._add(counter)
        return counter

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        gauge = Gauge(name, documentation, labelnames)
        self._add(gauge)
        return gauge

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS_S,
    ) -> Histogram:
        histogram = Histogram(name, documentation, labelnames, buckets=buckets)
        self._add(histogram)
        return histogram

    def on_collect(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` before every render, to refresh values kept elsewhere."""
        with self._lock:
            self._collectors.append(callback)

    def render(self) -> str:
        """The text exposition format 0.0.4, ending with a newline."""
        with self._lock:
            collectors = list(self._collectors)
            families = list(self._families.values())
        for callback in collectors:
            callback()
        lines = [line for family in families for line in family.render()]
        return "\n".join(lines) + "\n" if lines else ""

    def _add(self, family: Counter | Gauge | Histogram) -> None:
        # Histograms also own <name>_bucket/_sum/_count; keep those free too.
        taken = {family.name}
        if isinstance(family, Histogram):
            taken |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        with self._lock:
            existing = set(self._families)
            for other in self._families.values():
                if isinstance(other, Histogram):
                    existing |= {f"{other.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
            clash = taken & existing
            if clash:
                raise ValueError(f"metric name(s) already registered: {sorted(clash)}")
            self._families[family.name] = family


class _Handler(BaseHTTPRequestHandler):
    registry: ClassVar[Registry]

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != METRICS_PATH:
            self._reply(HTTPStatus.NOT_FOUND, b"not found; metrics are at /metrics\n")
            return
        self._reply(HTTPStatus.OK, self.registry.render().encode("utf-8"), CONTENT_TYPE)

    def _reply(
        self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("metrics http: " + format, *args)  # noqa: G003 - http.server's format


class MetricsServer:
    """Serves ``registry`` at ``http://<host>:<port>/metrics``; port 0 lets the kernel pick."""

    def __init__(self, registry: Registry, *, port: int, host: str = ALL_INTERFACES) -> None:
        self.registry = registry
        self.host = host
        self._requested_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._server is not None:
            return
        handler = type("MetricsHandler", (_Handler,), {"registry": self.registry})
        try:
            server = ThreadingHTTPServer((self.host, self._requested_port), handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.host}:{self._requested_port}: {exc}",
                reason="metrics_port",
            ) from exc
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
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
