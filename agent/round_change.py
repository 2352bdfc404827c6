"""The change an agent sends for a round: trained minus given weights, privatised, and
with a pruning mask, pruned weights held at zero and left out (protocol.masks)."""

from __future__ import annotations

import numpy as np

from agent.privacy import LocalDp, privatise_update
from protocol.masks import Masks, pack_update
from protocol.messages.rounds import RoundConfig

__all__ = ["round_change"]


def round_change(
    trained: list[np.ndarray],
    weights: list[np.ndarray],
    *,
    masks: Masks | None,
    config: RoundConfig,
    local_dp: LocalDp | None,
    plain: bool,
) -> tuple[list[np.ndarray], bool | None]:
    """The update's tensors and whether clipping cut it.

    Pruned entries are packed away unless the round aggregates updates whole: secure
    aggregation (``plain`` false) masks one flat vector, and DP-FedAvg (a clip norm) clips
    and adds noise to full tensors on the coordinator.
    """
    if masks is not None:
        trained = [w * m for w, m in zip(trained, masks, strict=True)]
    change = [new - old for new, old in zip(trained, weights, strict=True)]
    private, clipped = privatise_update(change, round_clip_norm=config.clip_norm, local=local_dp)
    deltas: list[np.ndarray] = list(private)
    if masks is not None and plain and config.clip_norm is None:
        deltas = list(pack_update(deltas, masks))
    return deltas, clipped
