"""The trainable head of a transfer task, in plain NumPy: exact, and no TensorFlow needed.

The head maps a backbone's (pooled) features to class probabilities: optional hidden Dense
layers with relu, then a Dense layer with softmax over the task's labels. Its weights are
``[W0, b0, W1, b1, ...]`` with ``W`` of shape (in, out), the order and shapes Keras's
``Dense`` layers use, so a head trained here is the same head in Keras.

A step is one SGD step on the mean cross-entropy of the batch, its gradient written out by
hand (backpropagation through softmax, Dense and relu). The shared training loop of
:class:`agent.training.Trainer` (shuffling, batches, validation hold-out, FedProx) drives it,
so a head trains the same way a LiteRT or Keras model does. Float64 inside a step keeps it
exact to float32 rounding against any other implementation of the same maths.

Standardised steps (on by default). Backbone features often carry large common offsets and
very unequal spreads (the transfer workload's: means up to 8.5 where the spread is 0.4), and
plain SGD then crawls along the mean direction: on the workload's non-IID split, FedAvg's
10-round accuracy swung by 15 points with the round seeds. So :meth:`HeadTrainer.train` takes
its SGD steps in the coordinates of the features standardised by the statistics of the
examples it is given: the first kernel and bias are mapped there (``W' = s W``,
``b' = b + m W``), trained on ``(x - m) / s``, and mapped back. The model, its weights and
what travels stay in raw feature coordinates (the same function before and after each map),
so FedAvg still averages raw deltas; only the optimiser is preconditioned, per agent and per
call, as a local Adam would be. FedProx's proximal term then acts in those coordinates.
``standardise=False`` gives plain SGD on raw features, step for step what Keras does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from agent.training import FloatArray, TrainConfig, Trainer, TrainReport, _Step
from protocol.errors import ModelError

__all__ = ["HeadTrainer"]

_PROBABILITY_EPSILON = 1e-7
# A feature whose spread is below this share of the widest one is only centred, not scaled:
# dividing by a near-zero spread would turn tiny steps into huge raw-coordinate weights.
_MIN_SCALE_RATIO = 1e-3


def _forward(weights: Sequence[np.ndarray], x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Every layer's input, and the softmax probabilities."""
    inputs = []
    h = x
    layers = len(weights) // 2
    for i in range(layers):
        inputs.append(h)
        z = h @ weights[2 * i] + weights[2 * i + 1]
        h = np.maximum(z, 0.0) if i < layers - 1 else z
    shifted = h - h.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return inputs, exp / exp.sum(axis=1, keepdims=True)


class HeadTrainer(Trainer):
    """A Dense head over features, trained in NumPy; see the module docstring."""

    name: ClassVar[str] = "head"

    def __init__(self, weights: Sequence[npt.ArrayLike], *, standardise: bool = True) -> None:
        arrays = [np.asarray(w, dtype=np.float32) for w in weights]
        if len(arrays) < 2 or len(arrays) % 2:
            raise ModelError(
                f"a head has kernel and bias pairs, got {len(arrays)} arrays", reason="bad_weights"
            )
        for i in range(0, len(arrays), 2):
            kernel, bias = arrays[i], arrays[i + 1]
            chained = i == 0 or arrays[i - 2].shape[1] == kernel.shape[0]
            if kernel.ndim != 2 or bias.shape != (kernel.shape[1],) or not chained:
                raise ModelError(
                    f"head layer {i // 2}: kernel {kernel.shape} and bias {bias.shape} do not "
                    "chain",
                    reason="bad_weights",
                )
        self._shapes = [a.shape for a in arrays]
        self._weights = arrays
        self._standardise = standardise

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self._shapes[0][0],)

    @property
    def num_classes(self) -> int:
        return int(self._shapes[-1][0])

    def get_weights(self) -> list[np.ndarray]:
        return [w.copy() for w in self._weights]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        self._weights = self._check_weights(weights, self._shapes)

    def predict(self, x: np.ndarray) -> np.ndarray:
        inputs = self._check_inputs(x).astype(np.float64)
        _, probabilities = _forward([w.astype(np.float64) for w in self._weights], inputs)
        return probabilities.astype(np.float32)

    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig) -> TrainReport:
        """Train in place; with ``standardise``, in standardised coordinates (module docstring)."""
        if not self._standardise:
            return super().train(x, y, config)
        inputs = self._check_inputs(x).astype(np.float64)
        mean = inputs.mean(axis=0)
        spread = inputs.std(axis=0)
        scale = np.where(spread > _MIN_SCALE_RATIO * spread.max(), spread, 1.0)
        raw = [w.astype(np.float64) for w in self._weights]
        self._weights = [
            (raw[0] * scale[:, np.newaxis]).astype(np.float32),
            (raw[1] + mean @ raw[0]).astype(np.float32),
            *self._weights[2:],
        ]
        try:
            report = super().train(((inputs - mean) / scale).astype(np.float32), y, config)
        finally:
            kernel = self._weights[0].astype(np.float64) / scale[:, np.newaxis]
            bias = self._weights[1].astype(np.float64) - mean @ kernel
            self._weights = [kernel.astype(np.float32), bias.astype(np.float32), *self._weights[2:]]
        return report

    def _make_step(self, config: TrainConfig, start: list[FloatArray]) -> _Step:
        lr = config.learning_rate
        mu = config.proximal_mu
        anchor = [w.astype(np.float64) for w in start]

        def step(x: FloatArray, y: npt.NDArray[np.int32]) -> float:
            weights = [w.astype(np.float64) for w in self._weights]
            inputs, probabilities = _forward(weights, x.astype(np.float64))
            n = len(x)
            picked = np.clip(probabilities[np.arange(n), y], _PROBABILITY_EPSILON, 1.0)
            loss = float(-np.mean(np.log(picked)))
            # d(mean cross-entropy)/d(logits) = (softmax - one_hot) / n
            grad = probabilities.copy()
            grad[np.arange(n), y] -= 1.0
            grad /= n
            grads: list[np.ndarray] = [np.empty(0)] * len(weights)
            for i in reversed(range(len(weights) // 2)):
                grads[2 * i] = inputs[i].T @ grad
                grads[2 * i + 1] = grad.sum(axis=0)
                if i > 0:
                    grad = (grad @ weights[2 * i].T) * (inputs[i] > 0.0)
            self._weights = [
                (w - lr * (g + mu * (w - a))).astype(np.float32)
                for w, g, a in zip(weights, grads, anchor, strict=True)
            ]
            return loss

        return step
