"""Magnitude pruning as part of federated training, on a schedule across rounds.

After each round's aggregation the coordinator prunes the new global weights to the
schedule's sparsity for that round and publishes the masks with the release; agents keep
pruned weights at zero and send only the kept entries of their change
(:mod:`protocol.masks`). The schedule is Zhu & Gupta's ("To prune, or not to prune", 2017):

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** 3

so pruning is fast while the model has many redundant weights and slows as the target
nears, with training rounds in between to recover. Each kernel (every tensor of two or more
dimensions) loses its own smallest-magnitude share; biases are never pruned. A weight once
pruned stays pruned: it is zero, so it is among the smallest at the next step too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from coordinator.state import CoordinatorState
from protocol.errors import ConfigError
from protocol.masks import MASK_CONTENT_TYPE, Masks, decode_masks, encode_masks, unpack_update
from protocol.messages.rounds import BlobRef, ModelRelease

__all__ = [
    "PRUNE_OPTION_PREFIX",
    "PruningSchedule",
    "magnitude_masks",
    "masks_of_release",
    "prune_after_round",
    "unpacked",
    "with_masks",
]

PRUNE_OPTION_PREFIX: Final = "prune_"
_MASK_KEY: Final = "prune_mask_r"
_LATEST_KEY: Final = "prune_mask_latest"


@dataclass(frozen=True, slots=True)
class PruningSchedule:
    """Sparsity ``target`` reached at round ``end_round``, from ``initial`` at ``start_round``,
    pruning every ``frequency`` rounds in between."""

    target: float
    start_round: int = 1
    end_round: int = 10
    frequency: int = 1
    initial: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ConfigError(
                f"pruning target must be between 0 and 1 (exclusive), got {self.target}",
                reason="bad_pruning_target",
            )
        if not 0.0 <= self.initial <= self.target:
            raise ConfigError(
                f"initial sparsity {self.initial} must be in [0, target {self.target}]",
                reason="bad_pruning_target",
            )
        if not 1 <= self.start_round <= self.end_round or self.frequency < 1:
            raise ConfigError(
                f"pruning needs 1 <= start_round <= end_round and frequency >= 1, got "
                f"{self.start_round}, {self.end_round}, {self.frequency}",
                reason="bad_pruning_schedule",
            )

    def sparsity_at(self, round_number: int) -> float:
        """The sparsity the weights of ``round_number``'s release have (0 before the start)."""
        if round_number < self.start_round:
            return 0.0
        if round_number >= self.end_round:
            return self.target
        # Steps happen every ``frequency`` rounds; in between the last step's sparsity holds.
        step = self.start_round + (round_number - self.start_round) // self.frequency * (
            self.frequency
        )
        progress = (step - self.start_round) / (self.end_round - self.start_round)
        return self.target + (self.initial - self.target) * (1.0 - progress) ** 3

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "start_round": self.start_round,
            "end_round": self.end_round,
            "frequency": self.frequency,
            "initial": self.initial,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PruningSchedule:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PruningSchedule | None:
        """``prune_target``, ``prune_start_round``, ... from a start_rounds command's options."""
        picked = {
            key.removeprefix(PRUNE_OPTION_PREFIX): value
            for key, value in options.items()
            if key.startswith(PRUNE_OPTION_PREFIX)
        }
        if not picked:
            return None
        unknown = set(picked) - set(cls.__dataclass_fields__)
        if unknown or "target" not in picked:
            raise ConfigError(
                f"pruning options: need prune_target; unknown {sorted(unknown)}",
                reason="bad_options",
            )
        try:
            return cls(
                target=float(picked["target"]),
                start_round=int(picked.get("start_round", 1)),
                end_round=int(picked.get("end_round", 10)),
                frequency=int(picked.get("frequency", 1)),
                initial=float(picked.get("initial", 0.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"pruning options: {exc}", reason="bad_options") from exc


def magnitude_masks(weights: Sequence[npt.ArrayLike], sparsity: float) -> Masks:
    """Per kernel, keep all but the ``sparsity`` share of smallest-magnitude values."""
    masks = []
    for weight in weights:
        array = np.asarray(weight)
        mask = np.ones(array.shape, bool)
        if array.ndim >= 2 and sparsity > 0.0:
            count = round(sparsity * array.size)
            # A stable sort: ties (the zeros of earlier steps first) break the same way
            # on every run, so a restarted coordinator computes the same mask.
            order = np.argsort(np.abs(array), axis=None, kind="stable")
            mask.flat[order[:count]] = False
            _keep_every_output_channel(array, mask)
        masks.append(mask)
    return masks


def _keep_every_output_channel(kernel: np.ndarray, mask: npt.NDArray[np.bool_]) -> None:
    """Keep the largest weight of any output channel (the last axis, in Keras kernels) that
    would lose all of them: an all-zero channel has a zero per-channel int8 scale, which
    the quantiser turns into NaN for its bias."""
    columns = kernel.reshape(-1, kernel.shape[-1])
    kept = mask.reshape(-1, kernel.shape[-1])  # a view: writing it writes ``mask``
    for channel in np.flatnonzero(~kept.any(axis=0)):
        kept[int(np.argmax(np.abs(columns[:, channel]))), channel] = True


def prune_after_round(
    state: CoordinatorState,
    schedule: PruningSchedule | None,
    round_number: int,
    weights: Sequence[np.ndarray],
) -> tuple[list[np.ndarray], bytes | None]:
    """The round's aggregated weights pruned by the schedule, and the encoded masks.

    Without a schedule the masks of the last pruned release still hold (a plan without
    pruning after one with it keeps the pruned weights at zero); without either, nothing.
    """
    previous = _last_masks(state, round_number)
    arrays = [np.asarray(w, np.float32) for w in weights]
    if previous is not None:
        arrays = [w * m for w, m in zip(arrays, previous, strict=True)]
    if schedule is None:
        if previous is None:
            return arrays, None
        masks = previous
    else:
        masks = magnitude_masks(arrays, schedule.sparsity_at(round_number))
        if previous is not None:
            masks = [m & p for m, p in zip(masks, previous, strict=True)]
    data = encode_masks(masks)
    digest = hashlib.sha256(data).hexdigest()
    state.put_blob(digest, data)
    state.put(f"{_MASK_KEY}{round_number}", digest)
    state.put(_LATEST_KEY, f"{round_number}:{digest}")
    return [w * m for w, m in zip(arrays, masks, strict=True)], data


def masks_of_release(state: CoordinatorState, release: ModelRelease) -> Masks | None:
    """The masks ``release`` was published with, if it was pruned."""
    if release.prune_mask is None:
        return None
    return decode_masks(state.blob(release.prune_mask.sha256))


def _last_masks(state: CoordinatorState, round_number: int) -> Masks | None:
    """The masks of the newest pruned release before ``round_number`` (a restarted
    coordinator closing the same round again must not start from that round's own)."""
    latest = state.get(_LATEST_KEY)
    if latest is not None:
        pruned_round, digest = latest.split(":", 1)
        if int(pruned_round) < round_number:
            return decode_masks(state.blob(digest))
    for earlier in range(round_number - 1, -1, -1):
        digest = state.get(f"{_MASK_KEY}{earlier}")
        if digest is not None:
            return decode_masks(state.blob(digest))
    return None


def unpacked(
    state: CoordinatorState, release: ModelRelease, deltas: list[np.ndarray]
) -> list[np.ndarray]:
    """An update against ``release`` with its pruned tensors scattered back to full shape."""
    masks = masks_of_release(state, release)
    if masks is None or len(masks) != len(deltas):
        return deltas  # the caller's count and shape checks refuse what does not fit
    return unpack_update(deltas, masks)


def with_masks(
    release: ModelRelease, blobs: dict[str, bytes], data: bytes | None
) -> tuple[ModelRelease, dict[str, bytes]]:
    """``release`` carrying the encoded masks as a blob chunked like its weights."""
    if data is None:
        return release, blobs
    chunk = release.weights.chunk_bytes
    ref = BlobRef(
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        chunk_count=-(-len(data) // chunk),
        chunk_bytes=chunk,
        content_type=MASK_CONTENT_TYPE,
    )
    return release.model_copy(update={"prune_mask": ref}), {**blobs, ref.sha256: data}
