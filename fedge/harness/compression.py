"""Federated runs of the reference digits task whose releases carry serving variants.

One run: a fresh federation of LiteRT-only agent processes on a real broker, a coordinator
that publishes variants (float32, int8 and, when the plan prunes, ``pruned``), a plan of
rounds. The system tests and ``bench/compress.py`` run a dense and a pruned plan side by
side and compare the last releases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.model_card import CardRow
from coordinator.pruning import PruningSchedule
from coordinator.rounds import RoundPlan
from fedge.control.model_card import read_model_card
from fedge.harness.federation import federation
from protocol.messages.rounds import ModelRelease, RoundConfig
from protocol.topics import Topics
from runtime.mqtt import parse_broker_url

__all__ = ["CompressionRun", "digits_plan", "run_digits", "wait_for_card"]

CARD_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class CompressionRun:
    """What a run ended with: its last release, its card, every round's metrics."""

    release: ModelRelease
    card: list[CardRow]
    rounds: list[dict[str, Any]]
    agent_logs_clean: bool


def digits_plan(
    rounds: int, *, agents: int, pruning: PruningSchedule | None, epochs: int = 1
) -> RoundPlan:
    """FedAvg over every agent each round, the reference workload's SGD settings."""
    return RoundPlan(
        rounds=rounds,
        min_agents=agents,
        deadline_s=120.0,
        config=RoundConfig(epochs=epochs, learning_rate=0.05, batch_size=16),
        pruning=pruning,
    )


def run_digits(
    root: Path, broker: Any, topics: Topics, *, agents: int, plan: RoundPlan, **agent_extra: Any
) -> CompressionRun:
    with federation(root, broker, topics, num_agents=agents, **agent_extra) as fed:
        coordinator = fed.start_coordinator(with_inference_files=True)
        fed.wait_for_agents(agents)
        outcomes = coordinator.run_plan_now(plan)
        failed = [o.reason for o in outcomes if not o.ok]
        if failed:
            raise AssertionError(f"rounds failed: {failed}")
        version = outcomes[-1].version
        text = coordinator.state.release_json(version or "")
        if text is None:
            raise AssertionError(f"no release {version}")
        release = ModelRelease.model_validate_json(text)
        return CompressionRun(
            release=release,
            card=wait_for_card(broker, topics, release.version, agents=agents),
            rounds=[dict(o.metrics, round=o.round) for o in outcomes],
            agent_logs_clean=all("Traceback" not in agent.log() for agent in fed.agents),
        )


def wait_for_card(
    broker: Any, topics: Topics, version: str, *, agents: int, timeout_s: float = CARD_TIMEOUT_S
) -> list[CardRow]:
    """The release's card once every agent serves it and has measured its variants."""
    address = parse_broker_url(
        broker.url,
        username=getattr(broker, "username", None),
        password=getattr(broker, "password", None),
    )
    deadline = time.monotonic() + timeout_s
    while True:
        _, rows, _ = read_model_card(address, topics, version)
        if sum(row.agents_serving for row in rows) >= agents or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)  # agents measure after they swap the release in; polling their status
