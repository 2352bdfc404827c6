"""A round's wall time split into its phases, from the timestamps fedge records.

The coordinator keeps in each finished round's metrics (``timings``) when it announced,
collected the last update, aggregated, evaluated and released; every agent's completion
message carries when it got the announcement, was ready to train (blobs fetched, trainer
and samples prepared), finished training and handed its update to the outbox, and the
coordinator adds when it accepted that update. The round waits for its last update, so the
phases follow that agent (the critical path):

- announce: round start -> the last agent has the announcement (select, sign, publish, deliver)
- fetch: -> that agent is ready to train (worker hand-off, hot swap, blobs, trainer, samples)
- train: -> its local training is done
- upload: -> the coordinator accepted its update (encode, outbox, broker, reassembly)
- validate and aggregate: -> the new weights exist
- evaluate: -> the coordinator evaluated them
- sign and release: -> the release is signed, stored and published

They add up to the round's time. Agents' clocks are compared with the coordinator's, so
this is exact on one machine and off by the clock skew across machines. Per-agent medians
(over all agents of the round) show whether the last agent was slow or merely last.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["AGENT_STEPS", "PHASES", "phase_table", "round_phases"]

PHASES = (
    "announce",
    "fetch",
    "train",
    "upload",
    "validate+aggregate",
    "evaluate",
    "sign+release",
)
# (phase, from, to) of one agent's own timestamps.
AGENT_STEPS = (
    ("queue", "received_at", "started_at"),
    ("fetch", "received_at", "ready_at"),
    ("train", "ready_at", "trained_at"),
    ("upload", "trained_at", "accepted_at"),
)
_AGENT_KEYS = ("received_at", "started_at", "ready_at", "trained_at", "sent_at", "accepted_at")


def round_phases(started_at: float, metrics: Mapping[str, Any]) -> dict[str, float] | None:
    """Seconds per phase of one finished round, or None when its timings are missing."""
    timings = metrics.get("timings") or {}
    agents = [a for a in (timings.get("agents") or {}).values() if all(k in a for k in _AGENT_KEYS)]
    coordinator = ("aggregated_at", "evaluated_at", "released_at")
    if not agents or not all(k in timings for k in coordinator):
        return None
    last = max(agents, key=lambda a: a["accepted_at"])
    marks = [
        started_at,
        last["received_at"],
        last["ready_at"],
        last["trained_at"],
        last["accepted_at"],
        timings["aggregated_at"],
        timings["evaluated_at"],
        timings["released_at"],
    ]
    phases = {name: max(0.0, b - a) for name, a, b in zip(PHASES, marks, marks[1:], strict=False)}
    phases["total"] = timings["released_at"] - started_at
    phases["coordinator_announce"] = timings.get("announced_at", started_at) - started_at
    phases["validate_all"] = float(timings.get("validate_s", 0.0))
    for name, start, end in AGENT_STEPS:
        phases[f"agents_median_{name}"] = statistics.median(a[end] - a[start] for a in agents)
    return phases


def phase_table(rows: Sequence[Mapping[str, float] | None], title: str = "") -> str:
    """Median seconds per phase over rounds, with each phase's share of the median total."""
    measured = [r for r in rows if r is not None]
    if not measured:
        return f"{title}: no round timings recorded"
    total = statistics.median(r["total"] for r in measured)
    lines = [f"{title} ({len(measured)} rounds; median s, share of the median round):"]
    for name in (*PHASES, "total"):
        value = statistics.median(r[name] for r in measured)
        lines.append(f"  {name:<20} {value * 1000:8.1f} ms  {100 * value / total:5.1f} %")
    medians = {
        name: statistics.median(r[f"agents_median_{name}"] for r in measured)
        for name, _, _ in AGENT_STEPS
    }
    extra = ", ".join(f"{name} {value * 1000:.1f}" for name, value in medians.items())
    lines.append(f"  every agent's median (ms): {extra}")
    coord = statistics.median(r["coordinator_announce"] for r in measured)
    validate = statistics.median(r["validate_all"] for r in measured)
    lines.append(
        f"  coordinator: announcing {coord * 1000:.1f} ms, validating all updates "
        f"{validate * 1000:.1f} ms"
    )
    return "\n".join(lines)
