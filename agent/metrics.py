"""The agent's Prometheus metrics.

Frame counts are kept by the intake, the outbox keeps its own size and drops, and the serving
model knows its version: :class:`AgentCollector` reads them from their owners at scrape time
(the client library's custom collector API) instead of counting them a second time. Only the
per-frame latency histogram is observed here, as it has no other home.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

from agent.intake import FrameCounts

__all__ = ["AgentCollector", "AgentReadings", "register_agent_metrics"]

FRAME_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NO_MODEL = "none"


@dataclass(frozen=True)
class AgentReadings:
    """Where the collector reads each number from, at scrape time."""

    counts: FrameCounts
    errors: Callable[[], int]
    outbox_size: Callable[[], int]
    outbox_dropped: Callable[[], int]
    model_version: Callable[[], str | None]


class AgentCollector:
    """Reads the agent's own counters when Prometheus scrapes."""

    def __init__(self, readings: AgentReadings) -> None:
        self._readings = readings

    def describe(self) -> Iterator[Metric]:
        # Names without reading the agent: the registry checks them for clashes on register.
        return self._families(read=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(read=True)

    def _families(self, *, read: bool) -> Iterator[Metric]:
        r, counts = self._readings, self._readings.counts

        def counter(name: str, documentation: str, value: Callable[[], float]) -> Metric:
            return CounterMetricFamily(name, documentation, value=value() if read else None)

        yield counter(
            "fedge_agent_frames_received_total",
            "Frames that arrived on a frame topic.",
            lambda: counts.received,
        )
        yield counter(
            "fedge_agent_frames_processed_total",
            "Frames whose result was queued.",
            lambda: counts.processed,
        )
        dropped = CounterMetricFamily(
            "fedge_agent_frames_dropped_total",
            "Frames dropped before inference.",
            labels=["reason"],
        )
        if read:
            dropped.add_metric(["stale"], counts.dropped_stale)
            dropped.add_metric(["rate"], counts.dropped_rate)
        yield dropped
        yield counter(
            "fedge_agent_frames_rejected_total",
            "Frames refused or failed in the pipeline.",
            lambda: counts.rejected,
        )
        yield counter("fedge_agent_errors_total", "Error events published.", r.errors)
        yield GaugeMetricFamily(
            "fedge_agent_outbox_messages",
            "Messages waiting for the broker's acknowledgement.",
            value=r.outbox_size() if read else None,
        )
        yield counter(
            "fedge_agent_outbox_dropped_total",
            "Results dropped from a full outbox.",
            r.outbox_dropped,
        )
        model = InfoMetricFamily("fedge_agent_model", "The model being served (always 1).")
        if read:
            model.add_metric([], {"version": r.model_version() or NO_MODEL})
        yield model


def register_agent_metrics(registry: CollectorRegistry, readings: AgentReadings) -> Histogram:
    """Register the agent's collector; return the latency histogram the frame loop observes."""
    registry.register(AgentCollector(readings))
    return Histogram(
        "fedge_agent_frame_seconds",
        "Decode to result (timings.total_ms) per processed frame.",
        buckets=FRAME_BUCKETS_S,
        registry=registry,
    )
