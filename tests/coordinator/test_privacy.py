"""DP-FedAvg: clipping, noise, the epsilon accountant and the budget stop, in memory."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from coordinator.daemon import plan_from_command
from coordinator.dp import DpOptions, private_mean
from coordinator.fleet import InMemoryFleet
from coordinator.private_rounds import RoundPrivacy
from coordinator.rounds import RoundPlan, RoundRunner
from coordinator.state import CoordinatorState
from protocol.errors import ConfigError
from protocol.messages.commands import StartRounds
from protocol.messages.rounds import RoundAnnouncement
from protocol.updates import clip_update, delta_norm
from tests.coordinator.test_rounds import (
    AGENTS,
    DEADLINE_S,
    SHAPES,
    FakeProducer,
    deltas_for,
    make_fleet,
    update_for,
)

DELTA = 1e-5


def independent_epsilon(noise_multiplier: float, rounds: int, delta: float = DELTA) -> float:
    """What dp_accounting says for ``rounds`` Gaussian mechanisms, with no sampling."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[CoordinatorState]:
    opened = CoordinatorState(tmp_path / "c.sqlite")
    yield opened
    opened.close()


def dp_plan(rounds: int = 3, **changes: object) -> RoundPlan:
    privacy = DpOptions(
        **{"noise_multiplier": 1.1, "clip_norm": 0.5, "delta": DELTA, **changes}  # type: ignore[arg-type]
    )
    return RoundPlan(rounds=rounds, min_agents=3, deadline_s=DEADLINE_S, privacy=privacy)


def runner(fleet: InMemoryFleet, state: CoordinatorState) -> RoundRunner:
    return RoundRunner(fleet=fleet, state=state, producer=FakeProducer())


def everyone(_round: int) -> tuple[str, ...]:
    return AGENTS


# the accountant ------------------------------------------------------------------------


def test_epsilon_per_round_equals_an_independent_dp_accounting_computation(
    state: CoordinatorState,
) -> None:
    fleet = make_fleet(everyone)
    outcomes = runner(fleet, state).run_plan(dp_plan())

    assert [o.ok for o in outcomes] == [True, True, True]
    for rounds, outcome in enumerate(outcomes, start=1):
        expected = independent_epsilon(1.1, rounds)
        assert abs(outcome.metrics["dp_epsilon"] - expected) <= 1e-9
        assert outcome.metrics["dp_delta"] == DELTA
        record = state.round(outcome.round)
        assert record is not None
        assert abs(record.metrics["dp_epsilon"] - expected) <= 1e-9
    # The release carries it too, signed with the rest.
    releases = {r.version: r for r in fleet.releases}
    spent = releases["r3"].privacy
    assert spent is not None
    assert abs(spent.epsilon - independent_epsilon(1.1, 3)) <= 1e-9
    assert (spent.delta, spent.rounds, spent.noise_multiplier) == (DELTA, 3, 1.1)
    assert releases["r0"].privacy is None
    # Every agent was told the clip norm.
    assert {a.config.clip_norm for a in fleet.announcements} == {0.5}


def test_adaptive_clipping_accounts_the_overall_multiplier_and_moves_the_clip_norm(
    state: CoordinatorState,
) -> None:
    fleet = make_fleet()

    def on_announce(announcement: RoundAnnouncement) -> None:
        for agent in announcement.selected:
            update = update_for(agent, announcement, deltas=clipped_by_agent(announcement))
            complete = update.complete.model_copy(update={"clipped": True})
            fleet.deliver(dataclasses.replace(update, complete=complete))

    fleet.on_announce = on_announce
    # sigma_b 0.15 on a count of 3: the noisy fraction within C is 0 +- 0.05, far below the
    # target 0.5, so C must grow by about exp(0.2 x 0.5) each round.
    plan = dp_plan(noise_multiplier=0.2, adaptive=True, clipped_count_stddev=0.15, clip_norm=0.01)
    outcomes = runner(fleet, state).run_plan(plan)

    assert all(o.ok for o in outcomes)
    for rounds, outcome in enumerate(outcomes, start=1):
        assert abs(outcome.metrics["dp_epsilon"] - independent_epsilon(0.2, rounds)) <= 1e-9
        assert outcome.metrics["dp_within_clip"] == 0
    norms = [float(a.config.clip_norm or 0.0) for a in fleet.announcements]
    assert norms[0] == 0.01
    for before, after in itertools.pairwise(norms):
        assert after / before == pytest.approx(np.exp(0.1), rel=0.05)
    assert plan.privacy is not None
    assert plan.privacy.update_noise_multiplier > 0.2


def clipped_by_agent(announcement: RoundAnnouncement) -> list[np.ndarray]:
    clip = announcement.config.clip_norm
    assert clip is not None
    clipped, _ = clip_update(deltas_for("agent-a", announcement.round), clip)
    return clipped


# the budget ----------------------------------------------------------------------------


def test_rounds_stop_before_the_budget_is_exceeded_and_the_stop_survives_a_restart(
    tmp_path: Path,
) -> None:
    budget = (independent_epsilon(1.1, 2) + independent_epsilon(1.1, 3)) / 2
    path = tmp_path / "c.sqlite"
    first = CoordinatorState(path)
    fleet = make_fleet(everyone)
    outcomes = runner(fleet, first).run_plan(dp_plan(10, target_epsilon=budget))
    assert [o.ok for o in outcomes] == [True, True, False]
    stop = outcomes[-1]
    assert stop.privacy_stop
    assert stop.reason is not None
    assert "privacy budget" in stop.reason
    assert len(fleet.announcements) == 2  # the third round was never announced
    assert outcomes[1].metrics["dp_epsilon"] <= budget
    first.close()

    # A restarted coordinator reads the ledger: a new plan is refused before any round.
    second = CoordinatorState(path)
    try:
        restarted = make_fleet(everyone)
        again = runner(restarted, second).run_plan(dp_plan(5, target_epsilon=budget))
        assert len(again) == 1
        assert again[0].privacy_stop
        assert restarted.announcements == []
        assert abs(RoundPrivacy(second).spent(DELTA) - independent_epsilon(1.1, 2)) <= 1e-9
        assert second.last_round_number() == 2
    finally:
        second.close()


# clipping and noise --------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(
            np.float32,
            hnp.array_shapes(max_dims=2, max_side=6),
            elements=st.floats(-1e6, 1e6, width=32),
        ),
        min_size=1,
        max_size=4,
    ),
    clip=st.floats(1e-6, 1e4),
)
def test_every_clipped_update_has_a_norm_at_most_c(arrays: list[np.ndarray], clip: float) -> None:
    clipped, norm = clip_update(arrays, clip)
    assert delta_norm(clipped) <= clip
    assert norm == pytest.approx(delta_norm(arrays))
    assert [c.shape for c in clipped] == [a.shape for a in arrays]
    if norm <= clip:
        for c, a in zip(clipped, arrays, strict=True):
            np.testing.assert_array_equal(c, a)


def test_the_coordinator_clips_again_what_an_agent_did_not() -> None:
    huge = [np.full(shape, 100.0, np.float32) for shape in SHAPES]
    options = DpOptions(noise_multiplier=1e-9, clip_norm=1.0)
    mean, count, within = private_mean(
        [(huge, None), (huge, None)],
        clip_norm=1.0,
        options=options,
        rng=np.random.default_rng(0),
    )
    assert (count, within) == (2, 0)
    assert delta_norm(mean) == pytest.approx(1.0, abs=1e-6)


def test_the_noise_on_the_mean_has_the_configured_spread() -> None:
    shape = (200_000,)
    zeros = [np.zeros(shape, np.float32)]
    options = DpOptions(noise_multiplier=1.5, clip_norm=2.0)
    count = 4
    mean, _, within = private_mean(
        [(zeros, False)] * count,
        clip_norm=2.0,
        options=options,
        rng=np.random.default_rng(7),
    )
    expected = 1.5 * 2.0 / count  # z C / m
    assert within == count
    assert float(np.mean(mean[0])) == pytest.approx(0.0, abs=5 * expected / np.sqrt(shape[0]))
    # 200k draws: the sample std is within 1% of sigma with overwhelming probability.
    assert float(np.std(mean[0])) == pytest.approx(expected, rel=0.01)


def test_adaptive_noise_on_the_updates_is_larger_as_andrew_et_al_say() -> None:
    options = DpOptions(noise_multiplier=1.0, clip_norm=1.0, adaptive=True)
    # sigma_b defaults to z: z_update = (1 - 1/4)^-1/2 z
    assert options.update_noise_multiplier == pytest.approx(1.0 / np.sqrt(0.75))
    with pytest.raises(ConfigError, match="half the noise"):
        DpOptions(noise_multiplier=2.0, clip_norm=1.0, adaptive=True, clipped_count_stddev=1.0)


# options -------------------------------------------------------------------------------


def test_start_command_options_become_the_plan_and_bad_combinations_are_refused() -> None:
    plan = plan_from_command(
        StartRounds(
            command_id="c1",
            strategy="fedadam",
            options={
                "dp_noise_multiplier": 0.8,
                "dp_clip_norm": "1.5",
                "dp_target_epsilon": 10,
                "dp_adaptive": "true",
                "eta": 0.01,
            },
        )
    )
    assert plan.privacy == DpOptions(
        noise_multiplier=0.8, clip_norm=1.5, target_epsilon=10.0, adaptive=True
    )
    assert plan.strategy_options == {"eta": 0.01}
    assert RoundPlan.from_json(plan.to_json()) == plan

    cases: tuple[tuple[str, dict[str, str | int | float | bool], str], ...] = (
        ("trimmed_mean", {"dp_noise_multiplier": 1, "dp_clip_norm": 1}, "dp_strategy"),
        ("fedavg", {"dp_noise_multiplier": 1, "dp_clip_norm": 1, "clip_norm": 1}, "dp_strategy"),
        ("fedavg", {"dp_noise_multiplier": 1}, "bad_dp"),
        ("fedavg", {"dp_noise_multiplier": 1, "dp_clip_norm": 1, "dp_nois": 2}, "unknown_option"),
        ("fedavg", {"dp_noise_multiplier": -1, "dp_clip_norm": 1}, "bad_dp"),
    )
    for strategy, options, reason in cases:
        with pytest.raises(ConfigError) as caught:
            plan_from_command(
                StartRounds(command_id="c2", strategy=strategy, options=dict(options))
            )
        assert caught.value.reason == reason, (strategy, options)
