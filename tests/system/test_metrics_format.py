"""Metrics are the client library's: served by its HTTP server, read back by its own parser.

The names and labels below are the ones fedge has always exported; dashboards and alerts
depend on them, so each appears here and in the scrapes of real processes
(tests/system/test_observability.py).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from agent.intake import FrameCounts
from agent.metrics import AgentReadings, register_agent_metrics
from coordinator.metrics import RoundMeter
from coordinator.rounds import RoundOutcome
from protocol.errors import ConfigError
from runtime.metrics import MetricsServer, new_registry
from tests.brokers import free_port

HTTP_TIMEOUT_S = 10.0

# name as it appears in the exposition -> (type, label names)
AGENT_METRICS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "fedge_agent_frames_received_total": ("counter", ()),
    "fedge_agent_frames_processed_total": ("counter", ()),
    "fedge_agent_frames_dropped_total": ("counter", ("reason",)),
    "fedge_agent_frames_rejected_total": ("counter", ()),
    "fedge_agent_errors_total": ("counter", ()),
    "fedge_agent_outbox_messages": ("gauge", ()),
    "fedge_agent_outbox_dropped_total": ("counter", ()),
    "fedge_agent_model_info": ("gauge", ("version",)),
    "fedge_agent_frame_seconds": ("histogram", ()),
}
COORDINATOR_METRICS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "fedge_coordinator_rounds_total": ("counter", ("outcome",)),
    "fedge_coordinator_round": ("gauge", ()),
    "fedge_coordinator_updates_total": ("counter", ()),
    "fedge_coordinator_update_bytes_total": ("counter", ()),
    "fedge_coordinator_accuracy": ("gauge", ()),
    "fedge_coordinator_federated_accuracy": ("gauge", ()),
    "fedge_coordinator_round_seconds": ("histogram", ()),
}
# What the library's process, platform and GC collectors add to every daemon.
PROCESS_METRICS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "process_cpu_seconds_total": ("counter", ()),
    "process_resident_memory_bytes": ("gauge", ()),
    "process_open_fds": ("gauge", ()),
    "process_start_time_seconds": ("gauge", ()),
    "python_info": ("gauge", ("implementation", "major", "minor", "patchlevel", "version")),
    "python_gc_collections_total": ("counter", ("generation",)),
}


@dataclass(frozen=True)
class Scrape:
    """One exposition, as ``prometheus_client.parser`` reads it."""

    families: dict[str, Metric]

    def value(self, name: str, **labels: str) -> float:
        """The one sample called ``name`` with exactly these labels."""
        found = [
            sample.value
            for family in self.families.values()
            for sample in family.samples
            if sample.name == name and sample.labels == labels
        ]
        assert len(found) == 1, f"{name}{labels} appears {len(found)} times"
        return found[0]

    def has(self, expected: Mapping[str, tuple[str, tuple[str, ...]]]) -> None:
        """Every metric in ``expected`` is there with its type and label names."""
        for name, (kind, labelnames) in expected.items():
            family_name = name.removesuffix("_total") if kind == "counter" else name
            assert family_name in self.families, f"{name} is missing"
            family = self.families[family_name]
            assert family.type == kind, f"{name} is a {family.type}, not a {kind}"
            main = f"{name}_count" if kind == "histogram" else name
            samples = [s for s in family.samples if s.name == main]
            assert samples, f"{name} has no samples"
            for sample in samples:
                assert tuple(sample.labels) == labelnames, f"{name} labels {sample.labels}"
            if kind == "histogram":
                buckets = [s for s in family.samples if s.name == f"{name}_bucket"]
                assert buckets[-1].labels["le"] == "+Inf"
                assert buckets[-1].value == samples[0].value
                assert [b.value for b in buckets] == sorted(b.value for b in buckets)


def parse(text: str) -> Scrape:
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        # The parser turns a sample outside its family into an untyped one: never valid here.
        assert family.type != "untyped", f"{family.name} has no TYPE of its own"
        assert family.name not in families, f"{family.name} appears twice"
        families[family.name] = family
    return Scrape(families)


def scrape(port: int) -> Scrape:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4
        return parse(response.read().decode("utf-8"))


def _render(registry: CollectorRegistry) -> Scrape:
    return parse(generate_latest(registry).decode("utf-8"))


class _AgentState:
    """What the agent's collector reads: counts it does not own, changed between scrapes."""

    def __init__(self) -> None:
        self.counts = FrameCounts()
        self.errors = 0
        self.outbox: list[bytes] = []
        self.outbox_dropped = 0
        self.version: str | None = None

    def readings(self) -> AgentReadings:
        return AgentReadings(
            counts=self.counts,
            errors=lambda: self.errors,
            outbox_size=lambda: len(self.outbox),
            outbox_dropped=lambda: self.outbox_dropped,
            model_version=lambda: self.version,
        )


def test_the_agent_collector_reads_its_owner_at_every_scrape() -> None:
    state, registry = _AgentState(), new_registry()
    latency = register_agent_metrics(registry, state.readings())
    before = _render(registry)
    before.has(AGENT_METRICS)
    before.has(PROCESS_METRICS)
    assert before.value("fedge_agent_frames_received_total") == 0
    assert before.value("fedge_agent_model_info", version="none") == 1
    assert before.value("fedge_agent_frame_seconds_count") == 0

    state.counts.received, state.counts.processed, state.counts.rejected = 7, 5, 1
    state.counts.dropped_stale, state.counts.dropped_rate = 1, 0
    state.errors, state.outbox, state.outbox_dropped = 2, [b"a", b"b", b"c"], 4
    state.version = "r3"
    for seconds in (0.004, 0.02, 0.02, 3.0, 30.0):
        latency.observe(seconds)
    after = _render(registry)
    after.has(AGENT_METRICS)
    assert after.value("fedge_agent_frames_received_total") == 7
    assert after.value("fedge_agent_frames_processed_total") == 5
    assert after.value("fedge_agent_frames_rejected_total") == 1
    assert after.value("fedge_agent_frames_dropped_total", reason="stale") == 1
    assert after.value("fedge_agent_frames_dropped_total", reason="rate") == 0
    assert after.value("fedge_agent_errors_total") == 2
    assert after.value("fedge_agent_outbox_messages") == 3
    assert after.value("fedge_agent_outbox_dropped_total") == 4
    # A swapped model replaces the old version's series rather than adding one.
    model = after.families["fedge_agent_model_info"]
    assert [(s.labels, s.value) for s in model.samples] == [({"version": "r3"}, 1.0)]
    assert after.value("fedge_agent_frame_seconds_bucket", le="0.005") == 1
    assert after.value("fedge_agent_frame_seconds_bucket", le="0.025") == 3
    assert after.value("fedge_agent_frame_seconds_bucket", le="5.0") == 4
    assert after.value("fedge_agent_frame_seconds_bucket", le="+Inf") == 5
    assert after.value("fedge_agent_frame_seconds_count") == 5
    assert after.value("fedge_agent_frame_seconds_sum") == pytest.approx(33.044)


def _outcome(number: int, *, ok: bool, **metrics: float) -> RoundOutcome:
    return RoundOutcome(
        number, ok=ok, version=f"r{number}" if ok else None, reason=None, metrics=metrics
    )


def test_the_round_meter_counts_each_update_once() -> None:
    registry = new_registry()
    meter = RoundMeter(registry, current_round=4)
    start = _render(registry)
    start.has(COORDINATOR_METRICS)
    assert start.value("fedge_coordinator_round") == 4
    assert start.value("fedge_coordinator_rounds_total", outcome="done") == 0
    assert start.value("fedge_coordinator_rounds_total", outcome="failed") == 0

    # Progress carries running totals: 1 then 3 updates of round 5 are 3 updates, not 4.
    meter.progress({"round": 5, "received": 1, "bytes_up": 100})
    meter.progress({"round": 5, "received": 3, "bytes_up": 350})
    meter.outcome(_outcome(5, ok=True, accuracy=0.75, federated_accuracy=0.5, seconds=12.0))
    meter.progress({"round": 6, "received": 2, "bytes_up": 200})
    meter.outcome(_outcome(6, ok=False))
    end = _render(registry)
    end.has(COORDINATOR_METRICS)
    assert end.value("fedge_coordinator_round") == 6
    assert end.value("fedge_coordinator_updates_total") == 5
    assert end.value("fedge_coordinator_update_bytes_total") == 550
    assert end.value("fedge_coordinator_rounds_total", outcome="done") == 1
    assert end.value("fedge_coordinator_rounds_total", outcome="failed") == 1
    assert end.value("fedge_coordinator_accuracy") == 0.75  # a failed round leaves it
    assert end.value("fedge_coordinator_federated_accuracy") == 0.5
    assert end.value("fedge_coordinator_round_seconds_bucket", le="10.0") == 0
    assert end.value("fedge_coordinator_round_seconds_bucket", le="30.0") == 1
    assert end.value("fedge_coordinator_round_seconds_count") == 1


def test_the_server_serves_both_formats_and_names_a_taken_port() -> None:
    state, registry = _AgentState(), new_registry()
    register_agent_metrics(registry, state.readings())
    state.counts.received = 9
    server = MetricsServer(registry, port=free_port(), host="127.0.0.1")
    server.start()
    try:
        assert scrape(server.port).value("fedge_agent_frames_received_total") == 9
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            text = response.read().decode("utf-8")
        parsed = openmetrics_families(text)  # type: ignore[no-untyped-call]
        families = {family.name: family for family in parsed}
        assert families["fedge_agent_model"].type == "info"
        assert families["fedge_agent_frames_received"].samples[0].value == 9
        with pytest.raises(ConfigError) as taken:
            MetricsServer(registry, port=server.port, host="127.0.0.1").start()
        assert taken.value.reason == "metrics_port"
    finally:
        server.stop()
