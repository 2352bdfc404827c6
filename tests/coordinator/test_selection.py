"""Selection by trainer: a Keras-only release leaves LiteRT-only agents out, saying why."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from coordinator.fleet import AgentInfo, InMemoryFleet
from coordinator.rounds import RoundRunner
from coordinator.state import CoordinatorState
from protocol.errors import FedgeError
from protocol.messages.rounds import ModelMetrics, ModelRelease
from tests.coordinator.test_rounds import FakeProducer, plan_of, reacting

REFUSAL = "layer 'bn' (BatchNormalization) cannot train as builtin TFLite: batch statistics"
TRAINERS = {
    "agent-a": ("litert",),
    "agent-b": ("litert", "keras"),
    "agent-c": ("keras",),
}


class KerasOnlyProducer(FakeProducer):
    def release(
        self,
        *,
        version: str,
        round_number: int,
        weights: Sequence[np.ndarray],
        metrics: ModelMetrics | None,
    ) -> tuple[ModelRelease, dict[str, bytes]]:
        release, blobs = super().release(
            version=version, round_number=round_number, weights=weights, metrics=metrics
        )
        update = {"recipe": "keras", "trainers": ("keras",), "litert_refusal": REFUSAL}
        return release.model_copy(update=update), blobs


def _fleet(agents: Sequence[str]) -> InMemoryFleet:
    fleet = InMemoryFleet(
        known={a: AgentInfo(a, online=True, can_train=True, trainers=TRAINERS[a]) for a in agents}
    )
    fleet.on_announce = reacting(fleet, lambda _round: agents)
    return fleet


def test_litert_only_agents_are_left_out_with_the_reason(tmp_path: Path) -> None:
    fleet = _fleet(tuple(TRAINERS))
    progress: list[dict[str, object]] = []
    state = CoordinatorState(tmp_path / "c.sqlite")
    try:
        runner = RoundRunner(
            fleet=fleet, state=state, producer=KerasOnlyProducer(), on_progress=progress.append
        )
        outcome = runner.run_round(plan_of(min_agents=2))
        assert outcome.ok, outcome.reason
        record = state.round(1)
        assert record is not None
        assert record.selected == ("agent-b", "agent-c")
    finally:
        state.close()
    left_out = [p["left_out"] for p in progress if "left_out" in p]
    assert left_out
    assert left_out[0] == {
        "agent-a": f"it trains with litert only; this model needs keras ({REFUSAL})"
    }


def test_too_few_fitting_agents_says_how_many_lack_a_trainer(tmp_path: Path) -> None:
    fleet = _fleet(("agent-a", "agent-c"))
    state = CoordinatorState(tmp_path / "c.sqlite")
    try:
        runner = RoundRunner(fleet=fleet, state=state, producer=KerasOnlyProducer())
        with pytest.raises(FedgeError, match=r"only 1 agents .* 2 needed \(1 more lack a fit"):
            runner.run_round(plan_of(min_agents=2))
        assert fleet.announcements == []
    finally:
        state.close()
