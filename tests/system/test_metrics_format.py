"""The metrics registry speaks Prometheus text format 0.0.4, checked by a strict parser."""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest

from fedge.metrics import CONTENT_TYPE, MetricsServer, Registry
from protocol.errors import ConfigError
from tests.brokers import free_port

HTTP_TIMEOUT_S = 10.0

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
_VALUE = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN"
_SAMPLE = re.compile(
    rf"(?P<name>{_NAME})(?:\{{(?P<labels>{_LABEL}(?:,{_LABEL})*)?\}})? (?P<value>{_VALUE})"
    r"(?: -?\d+)?"
)
_HELP = re.compile(rf"# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass
class Family:
    name: str
    kind: str = "untyped"
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        found = [v for n, ls, v in self.samples if n == name and ls == labels]
        assert len(found) == 1, f"{name}{labels} appears {len(found)} times in {self.samples}"
        return found[0]


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def _family_of(sample_name: str, families: dict[str, Family]) -> Family:
    if sample_name in families:
        return families[sample_name]
    for suffix in _HISTOGRAM_SUFFIXES:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and families.get(base, Family(base)).kind == "histogram":
            return families[base]
    raise AssertionError(f"sample {sample_name} has no # TYPE line before it")


def _check_histogram(family: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for name, labels, value in family.samples:
        if name == f"{family.name}_bucket":
            assert "le" in labels, f"bucket without le in {family.name}"
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            series.setdefault(rest, []).append((float(labels["le"]), value))
    for rest, buckets in series.items():
        bounds = [bound for bound, _ in buckets]
        counts = [count for _, count in buckets]
        assert bounds == sorted(bounds), f"{family.name}: {bounds}"
        assert bounds[-1] == math.inf, f"{family.name} has no +Inf bucket"
        assert counts == sorted(counts), f"{family.name} buckets are not cumulative: {counts}"
        labels = dict(rest)
        assert family.value(f"{family.name}_count", **labels) == counts[-1]
        family.value(f"{family.name}_sum", **labels)


def parse_exposition(text: str) -> dict[str, Family]:
    """Parse text format 0.0.4 strictly; fail on anything a Prometheus server would reject."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    finished: set[str] = set()
    current: str | None = None
    for line in text[:-1].split("\n"):
        if not line:
            continue
        if line.startswith("# HELP "):
            match = _HELP.fullmatch(line)
            assert match, f"bad HELP line: {line!r}"
            family = families.setdefault(match.group(1), Family(match.group(1)))
            assert family.help is None, f"second HELP for {family.name}"
            family.help = _unescape(match.group(2))
            continue
        if line.startswith("# TYPE "):
            match = _TYPE.fullmatch(line)
            assert match, f"bad TYPE line: {line!r}"
            family = families.setdefault(match.group(1), Family(match.group(1)))
            assert not family.samples, f"TYPE after samples of {family.name}"
            family.kind = match.group(2)
            continue
        if line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"bad sample line: {line!r}"
        name = match.group("name")
        labels_text = match.group("labels") or ""
        labels = {key: _unescape(value) for key, value in re.findall(_LABEL, labels_text)}
        assert len(labels) == len(re.findall(_LABEL, labels_text)), f"repeated label: {line!r}"
        family = _family_of(name, families)
        if current != family.name:
            assert family.name not in finished, f"samples of {family.name} are not grouped"
            if current is not None:
                finished.add(current)
            current = family.name
        assert (name, labels) not in [(n, ls) for n, ls, _ in family.samples], f"dup: {line!r}"
        family.samples.append((name, labels, float(match.group("value"))))
    for family in families.values():
        if family.kind == "histogram":
            _check_histogram(family)
        if family.kind == "counter":
            assert all(value >= 0 for _, _, value in family.samples), family.samples
    return families


def _registry_with_every_type() -> Registry:
    registry = Registry()
    plain = registry.counter("demo_events_total", "Events seen.\nSecond line with \\ backslash.")
    plain.inc()
    plain.inc(2.5)
    labelled = registry.counter("demo_frames_total", "Frames by outcome.", ["outcome", "camera"])
    labelled.labels("ok", 'cam "one"\nback\\slash').inc(3)
    labelled.labels(outcome="dropped", camera="cam2").inc()
    registry.counter("demo_read_total", "Read when scraped.").set_function(lambda: 42)
    gauge = registry.gauge("demo_queue", "Queue length.")
    gauge.set(7)
    gauge.dec(2)
    registry.gauge("demo_temperature_celsius", "Negative is fine.").set(-3.25)
    registry.gauge("demo_info", "Build info.", ["version"]).labels("1.2.3").set(1)
    latency = registry.histogram("demo_latency_seconds", "Latency.", buckets=(0.01, 0.1, 1.0))
    for value in (0.005, 0.05, 0.05, 0.5, 2.0):
        latency.observe(value)
    by_camera = registry.histogram("demo_size_bytes", "Sizes.", ["camera"], buckets=(100, 1000))
    by_camera.labels("a").observe(50)
    by_camera.labels("b").observe(5000)
    registry.histogram("demo_unused_seconds", "No observations yet.")
    return registry


def test_every_metric_type_renders_valid_exposition_text() -> None:
    families = parse_exposition(_registry_with_every_type().render())
    assert families["demo_events_total"].kind == "counter"
    assert families["demo_events_total"].help == "Events seen.\nSecond line with \\ backslash."
    assert families["demo_events_total"].value("demo_events_total") == 3.5
    frames = families["demo_frames_total"]
    assert frames.value("demo_frames_total", outcome="ok", camera='cam "one"\nback\\slash') == 3
    assert frames.value("demo_frames_total", outcome="dropped", camera="cam2") == 1
    assert families["demo_read_total"].value("demo_read_total") == 42
    assert families["demo_queue"].kind == "gauge"
    assert families["demo_queue"].value("demo_queue") == 5
    assert families["demo_temperature_celsius"].value("demo_temperature_celsius") == -3.25
    assert families["demo_info"].value("demo_info", version="1.2.3") == 1
    latency = families["demo_latency_seconds"]
    assert latency.kind == "histogram"
    buckets = [latency.value("demo_latency_seconds_bucket", le=le) for le in ("0.01", "0.1")]
    assert buckets == [1, 3]
    assert latency.value("demo_latency_seconds_bucket", le="1.0") == 4
    assert latency.value("demo_latency_seconds_bucket", le="+Inf") == 5
    assert latency.value("demo_latency_seconds_sum") == pytest.approx(2.605)
    sizes = families["demo_size_bytes"]
    assert sizes.value("demo_size_bytes_bucket", camera="a", le="100.0") == 1
    assert sizes.value("demo_size_bytes_bucket", camera="b", le="1000.0") == 0
    assert sizes.value("demo_size_bytes_count", camera="b") == 1
    unused = families["demo_unused_seconds"]
    assert unused.value("demo_unused_seconds_bucket", le="+Inf") == 0
    assert unused.value("demo_unused_seconds_count") == 0


def test_the_parser_refuses_what_prometheus_refuses() -> None:
    good = "# TYPE a_total counter\na_total 1\n"
    assert parse_exposition(good)["a_total"].value("a_total") == 1
    bad = [
        "# TYPE a_total counter\na_total 1",  # no final newline
        'a_total{x="1"} 1\n',  # no TYPE
        "# TYPE a_total counter\na_total one\n",
        '# TYPE a_total counter\na_total{x="\\q"} 1\n',  # bad escape
        '# TYPE a_total counter\na_total{x="1",x="2"} 1\n',
        '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',
        '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n',  # no +Inf
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na 2\n",  # not grouped
    ]
    for text in bad:
        with pytest.raises(AssertionError):
            parse_exposition(text)


def test_names_labels_and_buckets_are_checked_when_registered() -> None:
    registry = Registry()
    registry.histogram("taken_seconds", "Taken.")
    with pytest.raises(ValueError, match="already registered"):
        registry.gauge("taken_seconds_count", "Clashes with the histogram's count.")
    with pytest.raises(ValueError, match="_total"):
        registry.counter("events", "A counter without _total.")
    with pytest.raises(ValueError, match="invalid metric name"):
        registry.gauge("1bad", "Starts with a digit.")
    with pytest.raises(ValueError, match="reserved"):
        registry.histogram("sized_bytes", "Uses le.", ["le"])
    with pytest.raises(ValueError, match="increasing"):
        registry.histogram("odd_seconds", "Unsorted.", buckets=(1.0, 0.5))
    counter = registry.counter("kept_total", "Kept.", ["kind"])
    with pytest.raises(ValueError, match="labels"):
        counter.inc()
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels("a").inc(-1)


def test_the_server_serves_metrics_and_nothing_else() -> None:
    registry = _registry_with_every_type()
    server = MetricsServer(registry, port=free_port(), host="127.0.0.1")
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=HTTP_TIMEOUT_S) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == CONTENT_TYPE
            body = response.read().decode("utf-8")
        assert parse_exposition(body)["demo_read_total"].value("demo_read_total") == 42
        for path in ("/", "/metric", "/metrics/extra"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{base}{path}", timeout=HTTP_TIMEOUT_S)
            assert refused.value.code == 404
            refused.value.close()
        with pytest.raises(ConfigError) as taken:
            MetricsServer(registry, port=server.port, host="127.0.0.1").start()
        assert taken.value.reason == "metrics_port"
    finally:
        server.stop()
