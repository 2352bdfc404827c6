"""The benchmarks' measuring tools: round phases, process memory, profile stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedge.harness.memory import available_bytes, memory_of, total_memory
from fedge.harness.phases import PHASES, phase_table, round_phases
from fedge.harness.profile import split_samples, stage_of

STARTED = 1000.0


def _agent(received: float, accepted: float) -> dict[str, float]:
    return {
        "received_at": received,
        "started_at": received + 0.001,
        "ready_at": received + 0.010,
        "trained_at": received + 0.030,
        "sent_at": received + 0.031,
        "accepted_at": accepted,
    }


def _metrics() -> dict[str, object]:
    return {
        "timings": {
            "announced_at": STARTED + 0.004,
            "agents": {
                "a": _agent(STARTED + 0.005, STARTED + 0.050),
                "b": _agent(STARTED + 0.020, STARTED + 0.080),
            },
            "validate_s": 0.002,
            "aggregated_at": STARTED + 0.090,
            "evaluated_at": STARTED + 0.100,
            "released_at": STARTED + 0.120,
        }
    }


def test_a_round_splits_along_its_last_update() -> None:
    phases = round_phases(STARTED, _metrics())
    assert phases is not None
    # Agent b's update came last, so its steps are the round's.
    assert phases["announce"] == pytest.approx(0.020)
    assert phases["fetch"] == pytest.approx(0.010)
    assert phases["train"] == pytest.approx(0.020)
    assert phases["upload"] == pytest.approx(0.030)
    assert phases["validate+aggregate"] == pytest.approx(0.010)
    assert phases["evaluate"] == pytest.approx(0.010)
    assert phases["sign+release"] == pytest.approx(0.020)
    assert sum(phases[name] for name in PHASES) == pytest.approx(phases["total"])
    assert phases["total"] == pytest.approx(0.120)
    assert phases["agents_median_train"] == pytest.approx(0.020)
    assert "announce" in phase_table([phases, None], "test")


def test_a_round_without_timings_has_no_phases() -> None:
    assert round_phases(STARTED, {}) is None
    assert round_phases(STARTED, {"timings": {"agents": {}}}) is None
    assert "no round timings" in phase_table([None], "test")


def test_memory_of_this_process_and_the_machine() -> None:
    me = memory_of(os.getpid())
    assert 0 < me["uss"] <= me["pss"] <= me["rss"] <= me["peak_rss"]
    both = total_memory([os.getpid(), os.getpid()])
    assert both["rss"] >= 2 * me["rss"] * 0.9
    assert memory_of(2**22 + 12345) == {"rss": 0, "pss": 0, "uss": 0, "peak_rss": 0}
    assert available_bytes() > 0


def test_profile_stacks_go_to_their_innermost_stage(tmp_path: Path) -> None:
    outer = "Thread.run (threading.py:982);MqttLink._run (runtime/mqtt.py:237)"
    decode = (
        f"{outer};FrameProcessor.process (agent/pipeline.py:70);"
        "decode_image (agent/preprocess.py:60)"
    )
    outbox = f"{outer};Outbox.put (agent/outbox.py:80)"
    paho = f"{outer};Client._loop (paho/mqtt/client.py:1667)"
    assert stage_of(decode.split(";")) == "decode"
    assert stage_of(outbox.split(";")) == "outbox (SQLite)"
    assert stage_of(paho.split(";")) == "MQTT (paho, sockets)"
    assert stage_of(["main (somewhere.py:1)"]) == "other"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"thread (1);{decode.split(';', 1)[1]} 6\nthread (1);{outbox.split(';', 1)[1]} 2\n"
        f"thread (2);{paho.split(';', 1)[1]} 2\n"
    )
    samples, shares = split_samples(raw)
    assert samples == 10
    assert shares == {"decode": 0.6, "outbox (SQLite)": 0.2, "MQTT (paho, sockets)": 0.2}
