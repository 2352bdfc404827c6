"""The round state machine in memory: selection, quorum, refusals, aggregation, resume."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from coordinator.fleet import AgentInfo, InMemoryFleet, ReceivedUpdate
from coordinator.production import blob_ref
from coordinator.rounds import ModelProducer, RoundOutcome, RoundPlan, RoundRunner
from coordinator.state import CoordinatorState
from protocol.errors import FedgeError, TensorCodecError
from protocol.messages.rounds import (
    ModelMetrics,
    ModelRelease,
    RoundAnnouncement,
    RoundConfig,
    UpdateComplete,
    UpdateEncoding,
)
from protocol.preprocess import PreprocessSpec
from protocol.tensors import Encoding
from protocol.updates import decode_weights, encode_update, encode_weights

SHAPES = ((3, 2), (2,), (4,))
INITIAL = (
    np.arange(6, dtype=np.float32).reshape(3, 2) / 10,
    np.array([0.5, -0.5], dtype=np.float32),
    np.linspace(-1.0, 1.0, 4, dtype=np.float32),
)
TARGET = tuple(np.ones(shape, dtype=np.float32) for shape in SHAPES)
TRAINABLE_BYTES = b"fake trainable model: its bytes never change"
AGENTS = ("agent-a", "agent-b", "agent-c")
EXAMPLES = {"agent-a": 10, "agent-b": 30, "agent-c": 60, "agent-x": 5}
DEADLINE_S = 10.0


class FakeProducer(ModelProducer):
    """Fixed initial weights; accuracy grows as the weights near TARGET."""

    def initial_weights(self) -> list[np.ndarray]:
        return [w.copy() for w in INITIAL]

    def evaluate(self, weights: Sequence[np.ndarray]) -> ModelMetrics:
        distance = math.sqrt(
            sum(
                float(np.sum((np.asarray(w, np.float64) - t) ** 2))
                for w, t in zip(weights, TARGET, strict=True)
            )
        )
        return ModelMetrics(accuracy=1.0 / (1.0 + distance), loss=distance, evaluated_on=10)

    def release(
        self,
        *,
        version: str,
        round_number: int,
        weights: Sequence[np.ndarray],
        metrics: ModelMetrics | None,
    ) -> tuple[ModelRelease, dict[str, bytes]]:
        weights_blob = encode_weights(weights)
        weights_ref = blob_ref(weights_blob, content_type="application/x-fedge-tensors")
        trainable_ref = blob_ref(TRAINABLE_BYTES, content_type="application/x-tflite")
        release = ModelRelease(
            version=version,
            model_name="fake",
            round=round_number,
            weights=weights_ref,
            trainable=trainable_ref,
            labels=("zero", "one"),
            preprocess=PreprocessSpec(height=8, width=8),
            metrics=metrics,
        )
        return release, {weights_ref.sha256: weights_blob, trainable_ref.sha256: TRAINABLE_BYTES}


class SimulatedCrashError(Exception):
    """Stands in for the coordinator process dying."""


def deltas_for(agent: str, round_number: int) -> list[np.ndarray]:
    """What an agent 'learned' in a round: small, deterministic, different per agent."""
    rng = np.random.default_rng([zlib.crc32(agent.encode()), round_number])
    return [rng.normal(0.0, 0.1, size=shape).astype(np.float32) for shape in SHAPES]


def received_update(
    agent: str,
    *,
    round_number: int,
    base_version: str,
    payload: bytes,
    encoding: UpdateEncoding = UpdateEncoding.FLOAT32,
) -> ReceivedUpdate:
    complete = UpdateComplete(
        round=round_number,
        agent=agent,
        base_model_version=base_version,
        update_sha256=hashlib.sha256(payload).hexdigest(),
        update_size_bytes=len(payload),
        chunk_count=1,
        chunk_bytes=max(1, len(payload)),
        encoding=encoding,
        num_examples=EXAMPLES[agent],
    )
    return ReceivedUpdate(complete=complete, payload=payload, bytes_received=len(payload))


def update_for(
    agent: str, announcement: RoundAnnouncement, deltas: Sequence[np.ndarray] | None = None
) -> ReceivedUpdate:
    chosen = deltas_for(agent, announcement.round) if deltas is None else deltas
    return received_update(
        agent,
        round_number=announcement.round,
        base_version=announcement.release.version,
        payload=encode_update(chosen, encoding=Encoding.FLOAT32),
    )


def reacting(
    fleet: InMemoryFleet, reporters: Callable[[int], Sequence[str]]
) -> Callable[[RoundAnnouncement], None]:
    """Agents that answer an announcement at once: those of ``reporters(round)`` selected."""

    def on_announce(announcement: RoundAnnouncement) -> None:
        for agent in reporters(announcement.round):
            if agent in announcement.selected:
                fleet.deliver(update_for(agent, announcement))

    return on_announce


def make_fleet(
    reporters: Callable[[int], Sequence[str]] | None = None, agents: Sequence[str] = AGENTS
) -> InMemoryFleet:
    fleet = InMemoryFleet(known={a: AgentInfo(a, online=True, can_train=True) for a in agents})
    if reporters is not None:
        fleet.on_announce = reacting(fleet, reporters)
    return fleet


def everyone(round_number: int) -> Sequence[str]:
    return AGENTS


def fedavg(
    base: Sequence[np.ndarray], agents: Sequence[str], round_number: int
) -> list[np.ndarray]:
    """The example-weighted mean of base + delta, computed independently of the code."""
    total = sum(EXAMPLES[a] for a in agents)
    result = []
    for index, tensor in enumerate(base):
        acc = np.zeros(tensor.shape, np.float64)
        for agent in sorted(agents):
            local = tensor + deltas_for(agent, round_number)[index]
            acc += EXAMPLES[agent] * local.astype(np.float64)
        result.append((acc / total).astype(np.float32))
    return result


@pytest.fixture
def open_state(tmp_path: Path) -> Iterator[Callable[[str], CoordinatorState]]:
    opened: list[CoordinatorState] = []

    def opener(name: str) -> CoordinatorState:
        state = CoordinatorState(tmp_path / name)
        opened.append(state)
        return state

    yield opener
    for state in opened:
        state.close()


def runner_for(
    fleet: InMemoryFleet,
    state: CoordinatorState,
    on_progress: Callable[[dict[str, object]], None] | None = None,
) -> RoundRunner:
    return RoundRunner(fleet=fleet, state=state, producer=FakeProducer(), on_progress=on_progress)


def plan_of(**changes: object) -> RoundPlan:
    options: dict[str, object] = {"min_agents": 2, "deadline_s": DEADLINE_S, **changes}
    return RoundPlan(**options)  # type: ignore[arg-type]


def assert_weights_equal(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


# 1 ------------------------------------------------------------------------------------------


def test_full_round_is_the_weighted_fedavg_of_every_update(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    fleet = make_fleet(everyone)
    state = open_state("c.sqlite")
    runner = runner_for(fleet, state)

    outcome = runner.run_round(plan_of())

    assert outcome.ok
    assert outcome.round == 1
    assert outcome.version == "r1"
    release = runner.current_release()
    assert release.version == "r1"
    assert release.round == 1
    new_weights = runner.weights_of(release)
    expected = fedavg(INITIAL, AGENTS, 1)
    for got, want in zip(new_weights, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert release.metrics == FakeProducer().evaluate(new_weights)

    record = state.round(1)
    assert record is not None
    assert record.state == "done"
    assert record.reason is None
    assert record.selected == AGENTS
    assert record.metrics["updates"] == 3
    assert record.metrics["selected"] == 3
    assert record.metrics["examples"] == sum(EXAMPLES[a] for a in AGENTS)
    assert record.metrics["version"] == "r1"
    payload_sizes = [
        len(encode_update(deltas_for(a, 1), encoding=Encoding.FLOAT32)) for a in AGENTS
    ]
    assert record.metrics["bytes_up"] == sum(payload_sizes)
    assert [r.version for r in fleet.releases] == ["r0", "r1"]
    assert fleet.releases[1] == release
    assert fleet.rejections == []
    # Every blob the release names is stored, so a restart can publish it again.
    assert decode_weights(state.blob(release.weights.sha256))[0].shape == SHAPES[0]
    assert state.blob(release.trainable.sha256) == TRAINABLE_BYTES


# 2 ------------------------------------------------------------------------------------------


def test_quorum_at_the_deadline_closes_the_round_with_what_came(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    reporters = AGENTS[:2]
    fleet = make_fleet(lambda _round: reporters)
    state = open_state("c.sqlite")
    runner = runner_for(fleet, state)

    outcome = runner.run_round(plan_of())

    assert outcome.ok
    assert outcome.version == "r1"
    assert outcome.metrics["updates"] == 2
    assert outcome.metrics["selected"] == 3
    announcement = fleet.announcements[0]
    assert announcement.selected == AGENTS
    # It waited for the third agent until the deadline, and not past it: no extension.
    assert fleet.now() >= announcement.deadline_at
    record = state.round(1)
    assert record is not None
    assert record.state == "done"
    assert record.deadline_at == announcement.deadline_at
    assert state.update_agents(1) == set(reporters)
    for got, want in zip(
        runner.weights_of(runner.current_release()), fedavg(INITIAL, reporters, 1), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_round_seconds_are_measured_on_the_fleet_clock(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    fleet = make_fleet(lambda _round: AGENTS[:2])
    runner = runner_for(fleet, open_state("c.sqlite"))

    outcome = runner.run_round(plan_of())

    issued_at = fleet.announcements[0].issued_at
    assert outcome.metrics["seconds"] == pytest.approx(fleet.now() - issued_at)
    assert outcome.metrics["seconds"] >= DEADLINE_S


# 3 ------------------------------------------------------------------------------------------


def test_no_quorum_extends_once_then_fails(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    fleet = make_fleet(lambda _round: AGENTS[:1])
    state = open_state("c.sqlite")
    runner = runner_for(fleet, state)

    outcome = runner.run_round(plan_of())

    assert not outcome.ok
    assert outcome.version is None
    assert outcome.reason is not None
    assert "quorum" in outcome.reason
    record = state.round(1)
    assert record is not None
    assert record.state == "failed"
    assert record.reason == outcome.reason
    announcement = fleet.announcements[0]
    # Extended exactly once: the stored deadline is one deadline_s past the first one.
    assert record.deadline_at == pytest.approx(announcement.deadline_at + DEADLINE_S, abs=1.0)
    assert fleet.now() >= record.deadline_at
    assert [r.version for r in fleet.releases] == ["r0"]
    assert runner.current_release().version == "r0"
    assert len(fleet.announcements) == 1


class LateFleet(InMemoryFleet):
    """Hands over one queued update only once the clock has passed ``release_at``."""

    late: ReceivedUpdate | None = None
    release_at: float = math.inf

    def next_update(self, round_number: int, timeout_s: float) -> ReceivedUpdate | None:
        if self.late is not None and self.now() >= self.release_at:
            late, self.late = self.late, None
            return late
        return super().next_update(round_number, timeout_s)


def test_an_update_during_the_extension_saves_the_round(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    fleet = LateFleet(known={a: AgentInfo(a, online=True, can_train=True) for a in AGENTS})

    def on_announce(announcement: RoundAnnouncement) -> None:
        fleet.deliver(update_for("agent-a", announcement))
        fleet.late = update_for("agent-b", announcement)
        fleet.release_at = announcement.deadline_at + DEADLINE_S / 2

    fleet.on_announce = on_announce
    state = open_state("c.sqlite")
    runner = runner_for(fleet, state)

    outcome = runner.run_round(plan_of())

    assert outcome.ok
    assert outcome.metrics["updates"] == 2
    record = state.round(1)
    assert record is not None
    assert record.state == "done"
    assert record.deadline_at > fleet.announcements[0].deadline_at


# 4 ------------------------------------------------------------------------------------------


def test_too_few_trainable_agents_online_raises_after_the_deadline(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    fleet = InMemoryFleet(
        known={
            "agent-a": AgentInfo("agent-a", online=True, can_train=True),
            "agent-b": AgentInfo("agent-b", online=False, can_train=True),
            "agent-c": AgentInfo("agent-c", online=True, can_train=False),
        }
    )
    state = open_state("c.sqlite")
    runner = runner_for(fleet, state)
    started = fleet.now()

    with pytest.raises(FedgeError) as caught:
        runner.run_round(plan_of())

    assert caught.value.reason == "not_enough_agents"
    assert "only 1 agents" in str(caught.value)
    assert fleet.now() >= started + DEADLINE_S
    assert fleet.announcements == []
    assert state.last_round_number() == 0


# 5 ------------------------------------------------------------------------------------------


def nan_payload() -> bytes:
    """A well-formed tensor payload holding a NaN, which encode_update itself refuses."""
    arrays = {f"d{i}": np.zeros(shape, np.float32) for i, shape in enumerate(SHAPES)}
    arrays["d1"][0] = np.nan
    metadata = {"fedge.format": "tensors", "fedge.format_version": "1"}
    metadata.update({f"fedge.encoding.d{i}": "float32" for i in range(len(SHAPES))})
    return save(arrays, metadata=metadata)


def test_bad_updates_are_refused_with_a_reason_and_the_round_goes_on(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    fleet = make_fleet(agents=AGENTS)
    huge = [np.full(shape, 10.0, np.float32) for shape in SHAPES]

    def on_announce(announcement: RoundAnnouncement) -> None:
        number, base = announcement.round, announcement.release.version
        wrong_shape = [np.zeros((2, 3), np.float32), *deltas_for("agent-a", number)[1:]]
        fleet.deliver(update_for("agent-a", announcement, wrong_shape))
        fleet.deliver(
            received_update(
                "agent-a", round_number=number, base_version=base, payload=nan_payload()
            )
        )
        fleet.deliver(update_for("agent-b", announcement, huge))
        fleet.deliver(
            received_update(
                "agent-b",
                round_number=number - 1,
                base_version=base,
                payload=encode_update(deltas_for("agent-b", number), encoding=Encoding.FLOAT32),
            )
        )
        fleet.deliver(update_for("agent-x", announcement))
        fleet.deliver(
            received_update(
                "agent-c",
                round_number=number,
                base_version="r7",
                payload=encode_update(deltas_for("agent-c", number), encoding=Encoding.FLOAT32),
            )
        )
        fleet.deliver(
            received_update("agent-c", round_number=number, base_version=base, payload=b"garbage!!")
        )
        fleet.deliver(update_for("agent-a", announcement, deltas_for("agent-a", number)[:2]))
        # The duplicate of agent-a's good update: stored once, aggregated once.
        fleet.deliver(update_for("agent-a", announcement))
        fleet.deliver(update_for("agent-a", announcement))
        fleet.deliver(update_for("agent-b", announcement))
        fleet.deliver(update_for("agent-c", announcement))

    fleet.on_announce = on_announce
    state = open_state("c.sqlite")
    runner = runner_for(fleet, state)

    outcome = runner.run_round(plan_of(max_update_norm=1.0))

    assert [(agent, event.reason) for agent, event in fleet.rejections] == [
        ("agent-a", "wrong_shape"),
        ("agent-a", "non_finite"),  # the tensor codec refuses NaN before validation runs
        ("agent-b", "norm_too_large"),
        ("agent-b", "stale_round"),
        ("agent-x", "not_selected"),
        ("agent-c", "wrong_base"),
        ("agent-c", TensorCodecError.default_reason),
        ("agent-a", "wrong_count"),
    ]
    for agent, event in fleet.rejections:
        assert agent is not None
        assert agent in event.message
    assert outcome.ok
    assert outcome.metrics["updates"] == 3
    assert outcome.metrics["examples"] == sum(EXAMPLES[a] for a in AGENTS)
    assert len(state.updates(1)) == 3
    for got, want in zip(
        runner.weights_of(runner.current_release()), fedavg(INITIAL, AGENTS, 1), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# 6 ------------------------------------------------------------------------------------------


def test_a_restarted_coordinator_resumes_the_round_it_was_in(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    plan = plan_of(min_agents=2)
    two = AGENTS[:2]

    # The reference: the same round, uncrashed.
    calm_fleet = make_fleet(lambda _round: two, agents=two)
    calm = runner_for(calm_fleet, open_state("calm.sqlite"))
    assert calm.run_round(plan).ok
    expected = calm.weights_of(calm.current_release())

    # agent-a reports, then the coordinator dies before agent-b's update arrives.
    first_fleet = make_fleet(lambda _round: two[:1], agents=two)

    def crash_after_first(progress: dict[str, object]) -> None:
        if progress["received"] == 1:
            raise SimulatedCrashError

    first_state = open_state("c.sqlite")
    with pytest.raises(SimulatedCrashError):
        runner_for(first_fleet, first_state, crash_after_first).run_round(plan)
    first_state.close()

    announced = first_fleet.announcements[0]
    second_fleet = InMemoryFleet()  # the registry is empty after a restart: no reselection
    second_fleet.deliver(update_for("agent-b", announced))
    second_state = open_state("c.sqlite")
    second = runner_for(second_fleet, second_state)
    record = second_state.round(1)
    assert record is not None
    assert record.state == "announced"
    assert second_state.update_agents(1) == {"agent-a"}

    outcome = second.run_round(plan)

    assert second_fleet.announcements == [announced]
    assert outcome.ok
    assert outcome.round == 1
    assert outcome.version == "r1"
    assert outcome.metrics["updates"] == 2
    assert second_state.last_round_number() == 1
    assert_weights_equal(second.weights_of(second.current_release()), expected)
    assert [r.version for r in second_fleet.releases] == ["r1"]


# 7 ------------------------------------------------------------------------------------------


FEDADAM = {"strategy": "fedadam", "strategy_options": {"eta": 0.05}}


def test_run_plan_runs_rounds_in_order_and_fedadam_state_survives_a_restart(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    plan = plan_of(rounds=3, **FEDADAM)

    calm_fleet = make_fleet(everyone)
    calm_state = open_state("calm.sqlite")
    calm = runner_for(calm_fleet, calm_state)
    outcomes = calm.run_plan(plan)

    assert [o.round for o in outcomes] == [1, 2, 3]
    assert [o.version for o in outcomes] == ["r1", "r2", "r3"]
    assert all(o.ok for o in outcomes)
    assert [a.round for a in calm_fleet.announcements] == [1, 2, 3]
    assert [a.release.version for a in calm_fleet.announcements] == ["r0", "r1", "r2"]
    assert calm_state.get("strategy_state_r3")["steps"] == 3
    assert calm.pending_plan() is None
    expected = calm.weights_of(calm.current_release())

    # The coordinator dies as round 3 is announced, before any agent answers.
    first_fleet = make_fleet(everyone)
    inner = first_fleet.on_announce
    assert inner is not None

    def die_on_round_three(announcement: RoundAnnouncement) -> None:
        if announcement.round == 3:
            raise SimulatedCrashError
        inner(announcement)

    first_fleet.on_announce = die_on_round_three
    first_state = open_state("c.sqlite")
    with pytest.raises(SimulatedCrashError):
        runner_for(first_fleet, first_state).run_plan(plan)
    first_state.close()

    second_fleet = make_fleet(everyone)
    second_state = open_state("c.sqlite")
    second = runner_for(second_fleet, second_state)
    assert second.pending_plan() == plan
    resumed = second.run_plan(plan)

    assert [o.round for o in resumed] == [3]
    assert resumed[0].ok
    assert resumed[0].version == "r3"
    assert second_state.get("strategy_state_r3")["steps"] == 3
    assert_weights_equal(second.weights_of(second.current_release()), expected)
    # FedAdam really moved differently from FedAvg: the state is what carried the result.
    fedavg_runner = runner_for(make_fleet(everyone), open_state("fedavg.sqlite"))
    fedavg_runner.run_plan(plan_of(rounds=3))
    plain = fedavg_runner.weights_of(fedavg_runner.current_release())
    assert any(not np.array_equal(a, b) for a, b in zip(plain, expected, strict=True))


def test_fedadam_state_survives_a_failed_round(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    fleet = make_fleet(lambda number: AGENTS[:1] if number == 2 else AGENTS)
    state = open_state("c.sqlite")
    runner = runner_for(fleet, state)
    plan = plan_of(**FEDADAM)

    outcomes: list[RoundOutcome] = [runner.run_round(plan) for _ in range(3)]

    assert [o.ok for o in outcomes] == [True, False, True]
    assert state.get("strategy_state_r3")["steps"] == 2


# 8 ------------------------------------------------------------------------------------------


def test_announced_config_carries_the_round_seed_and_the_fedprox_mu(
    open_state: Callable[[str], CoordinatorState],
) -> None:
    fleet = make_fleet(everyone)
    state = open_state("c.sqlite")
    runner = runner_for(fleet, state)
    config = RoundConfig(seed=7, epochs=2, learning_rate=0.01)
    plan = plan_of(rounds=2, strategy="fedprox", strategy_options={"mu": 0.1}, config=config)

    outcomes = runner.run_plan(plan)

    assert [o.ok for o in outcomes] == [True, True]
    announced = [a.config for a in fleet.announcements]
    assert [c.seed for c in announced] == [8, 9]
    assert all(c.proximal_mu == pytest.approx(0.1) for c in announced)
    assert all(c.epochs == 2 and c.learning_rate == pytest.approx(0.01) for c in announced)
    record = state.round(2)
    assert record is not None
    assert record.config == json.loads(announced[1].model_dump_json())


class DiesBeforeSavingAnnouncement(CoordinatorState):
    """The process dies between recording the round and recording its announcement."""

    def put(self, key: str, value: object) -> None:
        if key == "announcement":
            raise SimulatedCrashError
        super().put(key, value)


def test_a_crash_while_announcing_is_resumable(
    open_state: Callable[[str], CoordinatorState], tmp_path: Path
) -> None:
    dying = DiesBeforeSavingAnnouncement(tmp_path / "c.sqlite")
    try:
        with pytest.raises(SimulatedCrashError):
            runner_for(make_fleet(everyone), dying).run_round(plan_of())
    finally:
        dying.close()

    fleet = make_fleet(everyone)
    runner = runner_for(fleet, open_state("c.sqlite"))
    outcome = runner.run_round(plan_of())

    assert outcome.ok
    assert outcome.round == 1
    assert [a.round for a in fleet.announcements] == [1]
