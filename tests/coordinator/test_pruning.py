"""Pruning on a schedule: Zhu & Gupta's sparsity curve, magnitude masks, bad targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.plans import plan_from_command
from coordinator.pruning import PruningSchedule, magnitude_masks, prune_after_round
from coordinator.round_plan import RoundPlan
from coordinator.state import CoordinatorState
from protocol.errors import ConfigError, FedgeError
from protocol.masks import decode_masks, sparsity
from protocol.messages.commands import StartRounds


def test_the_schedule_rises_fast_then_slowly_to_the_target() -> None:
    schedule = PruningSchedule(target=0.8, start_round=1, end_round=5)
    values = [schedule.sparsity_at(r) for r in range(8)]
    assert values[0] == values[1] == 0.0
    assert values[5:] == [0.8, 0.8, 0.8]
    steps = np.diff(values[1:6])
    assert np.all(steps > 0)
    assert np.all(np.diff(steps) < 0)  # cubic: shrinking steps
    assert values[2] == pytest.approx(0.8 * (1 - 0.75**3))


def test_the_schedule_holds_between_steps() -> None:
    schedule = PruningSchedule(target=0.5, start_round=2, end_round=8, frequency=3)
    assert schedule.sparsity_at(3) == schedule.sparsity_at(4) == schedule.sparsity_at(2)
    assert schedule.sparsity_at(5) > schedule.sparsity_at(4)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 1.5])
def test_a_target_outside_zero_one_is_refused(target: float) -> None:
    with pytest.raises(ConfigError, match="between 0 and 1") as caught:
        PruningSchedule(target=target)
    assert caught.value.reason == "bad_pruning_target"


def test_a_start_rounds_command_with_a_bad_target_gets_a_clear_answer() -> None:
    command = StartRounds(command_id="c1", rounds=3, options={"prune_target": "1.2"})
    with pytest.raises(FedgeError, match="between 0 and 1"):
        plan_from_command(command)
    good = StartRounds(command_id="c1", rounds=3, options={"prune_target": "0.6"})
    plan = plan_from_command(good)
    assert plan.pruning == PruningSchedule(target=0.6)
    assert plan.strategy_options == {}
    assert RoundPlan.from_json(plan.to_json()) == plan


def test_magnitude_masks_prune_the_smallest_share_of_each_kernel_not_biases() -> None:
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(40, 10)), rng.normal(size=10)
    masks = magnitude_masks([kernel, bias], 0.75)
    assert masks[0].sum() == 100
    assert masks[1].all()
    assert np.abs(kernel[masks[0]]).min() >= np.abs(kernel[~masks[0]]).max()


def test_no_output_channel_is_pruned_away_entirely() -> None:
    kernel = np.ones((6, 4))
    kernel[:, 2] = [1e-3, 2e-3, 5e-3, 1e-4, 1e-3, 1e-3]  # the smallest column
    (mask,) = magnitude_masks([kernel], 0.75)
    assert mask[:, 2].tolist() == [False, False, True, False, False, False]
    assert mask.sum() == 6 + 1


def test_pruned_weights_stay_pruned_as_the_sparsity_grows(tmp_path: Path) -> None:
    state = CoordinatorState(tmp_path / "state.db")
    try:
        schedule = PruningSchedule(target=0.9, start_round=1, end_round=4)
        rng = np.random.default_rng(1)
        weights = [rng.normal(size=(20, 20)).astype(np.float32), np.ones(20, np.float32)]
        kept_before = np.ones((20, 20), bool)
        for number in range(1, 6):
            # Training moves every weight, pruned ones too (as a server optimiser might).
            moved = [w + rng.normal(scale=0.01, size=w.shape).astype(np.float32) for w in weights]
            weights, data = prune_after_round(state, schedule, number, moved)
            assert data is not None
            kept = decode_masks(data)[0]
            assert not np.any(kept & ~kept_before)
            assert np.all(weights[0][~kept] == 0)
            kept_before = kept
        # 0.9, less the few weights that keep every output channel alive
        assert sparsity(weights[:1]) == pytest.approx(0.9, abs=0.01)
        # A later plan without pruning keeps the last masks.
        after, data = prune_after_round(state, None, 6, [w + 1 for w in weights])
        assert data is not None
        assert np.all(after[0][~kept_before] == 0)
    finally:
        state.close()
