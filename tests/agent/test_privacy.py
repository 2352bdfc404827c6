"""The agent's side of DP: clipping to the round's C, and local DP with its own ledger."""

from __future__ import annotations

from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from agent.privacy import LocalDp, privatise_update
from protocol.errors import ConfigError
from protocol.updates import delta_norm


def test_updates_are_clipped_to_the_round_norm_and_say_so() -> None:
    big = [np.full((4, 4), 3.0, np.float32), np.ones(5, np.float32)]
    clipped, was_clipped = privatise_update(big, round_clip_norm=1.0, local=None)
    assert was_clipped is True
    assert delta_norm(clipped) <= 1.0
    small = [np.full(3, 0.01, np.float32)]
    kept, was_clipped = privatise_update(small, round_clip_norm=1.0, local=None)
    assert was_clipped is False
    np.testing.assert_array_equal(kept[0], small[0])
    untouched, was_clipped = privatise_update(big, round_clip_norm=None, local=None)
    assert was_clipped is None
    np.testing.assert_array_equal(untouched[0], big[0])


def test_local_dp_noise_has_the_configured_spread_and_the_ledger_survives(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "local_dp.json"
    local = LocalDp(noise_multiplier=0.7, clip_norm=2.0, ledger_path=ledger)
    zeros = [np.zeros(100_000, np.float32)]
    for _ in range(3):
        noised, _ = privatise_update(
            zeros, round_clip_norm=None, local=local, rng=np.random.default_rng(3)
        )
        assert float(np.std(noised[0])) == pytest.approx(0.7 * 2.0, rel=0.01)
    # A new LocalDp over the same file (an agent restart) continues the count.
    again = LocalDp(noise_multiplier=0.7, clip_norm=2.0, ledger_path=ledger)
    assert again.rounds_spent() == 3
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(0.7), 4)
    assert abs(again.charge() - accountant.get_epsilon(1e-5)) <= 1e-9


def test_local_dp_without_any_clip_norm_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        privatise_update(
            [np.ones(2, np.float32)], round_clip_norm=None, local=LocalDp(noise_multiplier=1.0)
        )
    assert caught.value.reason == "local_dp_clip"
