"""The one training loop both backends share: :class:`Trainer`, its config and its report.

The package docstring (``agent.training``) says how the loop runs.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final

import numpy as np
import numpy.typing as npt

from protocol.errors import ConfigError, ModelError

if TYPE_CHECKING:
    pass


_log = logging.getLogger(__name__)

TRAINER_KINDS: Final = ("litert", "keras")
TRAINABLE_SIGNATURES: Final = ("infer", "train", "get_weights", "set_weights")
DEFAULT_BATCH_SIZE: Final = 16
# Keras clips probabilities to this before the log; so does evaluate(), for the same numbers.
_PROBABILITY_EPSILON: Final = 1e-7
# Plain SGD on (mu / 2) * ||w - w_global||^2 diverges once lr * mu reaches 2.
_MAX_LR_TIMES_MU: Final = 2.0
_PREDICT_CHUNK: Final = 1024
_MODEL_SEED: Final = 0
_TF_CPP_MIN_LOG_LEVEL: Final = "2"
_TF_DEPRECATION_WARNING: Final = r"(?s).*tf\.lite\.Interpreter is deprecated"
_WEIGHT_NAME: Final = re.compile(r"w(\d+)")

FloatArray = npt.NDArray[np.float32]
# One SGD step on one batch (possibly shorter than the batch size) -> its mean loss.
_Step = Callable[[FloatArray, npt.NDArray[np.int32]], float]


@dataclass(frozen=True)
class TrainConfig:
    """How to train locally; invalid values raise :class:`ConfigError`."""

    epochs: int = 1
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = 0.05
    proximal_mu: float = 0.0
    seed: int = 0
    validation_fraction: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0.0:
            problems.append(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.proximal_mu >= 0.0:
            problems.append(f"proximal_mu must be non-negative, got {self.proximal_mu}")
        elif self.learning_rate * self.proximal_mu >= _MAX_LR_TIMES_MU:
            problems.append(
                f"learning_rate * proximal_mu must stay below {_MAX_LR_TIMES_MU} "
                f"or the proximal step diverges, got {self.learning_rate * self.proximal_mu}"
            )
        if self.seed < 0:
            problems.append(f"seed must be non-negative, got {self.seed}")
        if not 0.0 <= self.validation_fraction < 1.0:
            problems.append(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if problems:
            raise ConfigError("; ".join(problems), reason="bad_train_config")


@dataclass(frozen=True)
class TrainReport:
    """What one :meth:`Trainer.train` call did.

    ``loss`` is the mean training loss over the last epoch (per example, before each step);
    ``val_*`` are ``None`` without a validation hold-out; ``seconds`` is wall time.
    """

    num_examples: int
    loss: float
    val_accuracy: float | None
    val_loss: float | None
    seconds: float
    steps: int


def _loss_and_accuracy(probabilities: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, float]:
    """Mean cross-entropy (probabilities clipped as Keras does) and accuracy."""
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64)
    picked = np.clip(probs[np.arange(len(labels)), labels], _PROBABILITY_EPSILON, 1.0)
    loss = float(-np.mean(np.log(picked)))
    accuracy = float(np.mean(np.argmax(probs, axis=1) == labels))
    return loss, accuracy


class Trainer(ABC):
    """A model that trains on local examples and exchanges its weights as NumPy arrays.

    Weights are float32 arrays in Keras ``get_weights()`` order and shapes, on every backend.
    """

    name: ClassVar[str]

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example (without the batch dimension)."""

    @property
    @abstractmethod
    def num_classes(self) -> int: ...

    @property
    def fixed_batch_size(self) -> int | None:
        """The only batch size :meth:`train` accepts, or ``None`` when any will do."""
        return None

    @abstractmethod
    def get_weights(self) -> list[np.ndarray]: ...

    @abstractmethod
    def set_weights(self, weights: Sequence[np.ndarray]) -> None: ...

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (n, num_classes) for inputs (n, *input_shape)."""

    @abstractmethod
    def _make_step(self, config: TrainConfig, start: list[FloatArray]) -> _Step:
        """The SGD step for one :meth:`train` call; ``start`` are the weights before it."""

    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig) -> TrainReport:
        """Train in place for ``config.epochs`` epochs; see the module docstring."""
        began = time.perf_counter()
        fixed = self.fixed_batch_size
        if fixed is not None and config.batch_size != fixed:
            raise ConfigError(
                f"this {self.name} model trains in batches of exactly {fixed}, "
                f"not {config.batch_size}",
                reason="bad_batch_size",
            )
        inputs, labels = self._check_examples(x, y)
        rng = np.random.default_rng(config.seed)
        order = rng.permutation(len(inputs))
        held_out = _validation_count(len(inputs), config.validation_fraction)
        train_idx, val_idx = order[: len(order) - held_out], order[len(order) - held_out :]
        start = [np.asarray(w, dtype=np.float32) for w in self.get_weights()]
        step = self._make_step(config, start)
        steps = 0
        epoch_loss = 0.0
        for _ in range(config.epochs):
            shuffled = train_idx[rng.permutation(len(train_idx))]
            total = 0.0
            for begin in range(0, len(shuffled), config.batch_size):
                batch = shuffled[begin : begin + config.batch_size]
                total += step(inputs[batch], labels[batch]) * len(batch)
                steps += 1
            epoch_loss = total / len(shuffled)
        val_loss = val_accuracy = None
        if held_out:
            val_loss, val_accuracy = self.evaluate(inputs[val_idx], labels[val_idx])
        report = TrainReport(
            num_examples=len(train_idx),
            loss=epoch_loss,
            val_accuracy=val_accuracy,
            val_loss=val_loss,
            seconds=time.perf_counter() - began,
            steps=steps,
        )
        _log.info(
            "%s trained on %d examples: %d steps, loss %.4f, %.3f s",
            self.name,
            report.num_examples,
            report.steps,
            report.loss,
            report.seconds,
        )
        return report

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) on labelled examples."""
        inputs, labels = self._check_examples(x, y)
        return _loss_and_accuracy(self.predict(inputs), labels)

    def _check_inputs(self, x: npt.ArrayLike) -> FloatArray:
        try:
            inputs = np.ascontiguousarray(x, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"inputs are not numeric: {exc}", reason="bad_input") from exc
        if inputs.shape[1:] != self.input_shape or len(inputs) == 0:
            raise ModelError(
                f"inputs of shape {inputs.shape} do not fit (n >= 1, "
                f"{', '.join(str(d) for d in self.input_shape)})",
                reason="bad_input_shape",
            )
        return inputs

    def _check_examples(
        self, x: npt.ArrayLike, y: npt.ArrayLike
    ) -> tuple[FloatArray, npt.NDArray[np.int32]]:
        inputs = self._check_inputs(x)
        raw = np.asarray(y)
        if raw.shape != (len(inputs),) or not np.issubdtype(raw.dtype, np.integer):
            raise ModelError(
                f"labels must be {len(inputs)} integers, got {raw.dtype} of shape {raw.shape}",
                reason="bad_labels",
            )
        if raw.min() < 0 or raw.max() >= self.num_classes:
            raise ModelError(
                f"labels must lie in 0..{self.num_classes - 1}, got {raw.min()}..{raw.max()}",
                reason="bad_labels",
            )
        return inputs, raw.astype(np.int32)

    def _check_weights(
        self, weights: Sequence[npt.ArrayLike], shapes: Sequence[tuple[int, ...]]
    ) -> list[FloatArray]:
        arrays = [np.ascontiguousarray(w, dtype=np.float32) for w in weights]
        got = [a.shape for a in arrays]
        if got != list(shapes):
            raise ModelError(
                f"weights of shapes {got} do not fit the model's {list(shapes)}",
                reason="bad_weights",
            )
        return arrays


def _validation_count(examples: int, fraction: float) -> int:
    """How many examples to hold out: at least one when asked, never all of them."""
    if fraction <= 0.0 or examples < 2:
        return 0
    return min(examples - 1, max(1, int(examples * fraction)))
