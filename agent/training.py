"""Local training on the agent: one :class:`Trainer` interface, two backends.

- :class:`LiteRTTrainer` trains a trainable ``.tflite`` (``infer``/``train``/``get_weights``/
  ``set_weights`` signatures, builtin ops only) inside the LiteRT interpreter: no TensorFlow
  needed, which is the point on a small device.
- :class:`KerasTrainer` trains a Keras model where TensorFlow is installed; TensorFlow is
  imported only when one is built, so importing this module never loads it.

Both run the same loop (:meth:`Trainer.train`), so the same data, config and starting
weights give the same SGD steps on either backend:

- the examples are shuffled every epoch with ``np.random.default_rng(config.seed)``, after a
  deterministic validation hold-out drawn from the same generator;
- batches of ``batch_size``, the last one shorter. The trainable ``.tflite`` has a fixed
  batch, so the short batch is zero-padded and masked out: its step is the mean over its
  real examples, as in Keras. Every training example is used, hence ``num_examples`` is the
  number of training examples (validation excluded), the weight FedAvg gives this update;
- FedProx (``proximal_mu > 0``): each step is plain SGD on
  ``loss + (mu / 2) * ||w - w_global||^2``, with ``w_global`` the weights at the start of
  :meth:`Trainer.train`: ``w <- w - lr * grad - lr * mu * (w - w_global)``, both terms at
  the step's starting weights. LiteRT applies the proximal term in NumPy through the weight
  signatures; Keras inside its training step.

Trainers are not thread-safe: use one per thread.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np
import numpy.typing as npt

from agent.runtime import load_interpreter_class
from protocol.errors import ConfigError, ModelError
from runtime.architectures import ARCHITECTURE_NAMES, keras_architecture

if TYPE_CHECKING:
    import keras

__all__ = [
    "TRAINER_KINDS",
    "KerasTrainer",
    "LiteRTTrainer",
    "TrainConfig",
    "TrainReport",
    "Trainer",
    "available_trainers",
    "build_keras_model",
    "make_trainer",
]

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


# --- LiteRT ----------------------------------------------------------------------------


def _weight_index(name: str) -> int:
    match = _WEIGHT_NAME.fullmatch(name)
    if match is None:
        raise ModelError(f"unexpected weight name {name!r} in get_weights", reason="bad_model")
    return int(match.group(1))


class LiteRTTrainer(Trainer):
    """Trains a trainable ``.tflite`` inside the LiteRT interpreter (no TensorFlow needed).

    The model's signatures: ``infer(x)`` -> ``output``; ``train(x, y, mask, lr)`` -> ``loss``,
    one SGD step on a fixed batch where ``mask`` (1.0 or 0.0 per example) marks the examples
    that count; ``get_weights()`` -> ``w0..wn``; ``set_weights(w0..wn)``. ``batch_size`` must
    equal the fixed batch of ``train`` (else :class:`ConfigError`).
    """

    name: ClassVar[str] = "litert"

    def __init__(self, trainable_tflite: bytes, *, batch_size: int, num_threads: int = 1) -> None:
        runtime = load_interpreter_class()
        # The interpreter reads the flatbuffer in place: it must outlive the interpreter.
        self._content = bytes(trainable_tflite)
        self._lock = threading.Lock()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_TF_DEPRECATION_WARNING)
                interpreter = runtime.interpreter_class(
                    model_content=self._content, num_threads=num_threads
                )
            available = interpreter.get_signature_list()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"not a usable TFLite model: {exc}", reason="bad_model") from exc
        missing = [s for s in TRAINABLE_SIGNATURES if s not in available]
        if missing:
            raise ModelError(
                f"not a trainable model: signatures {', '.join(missing)} are missing",
                reason="not_trainable",
            )
        try:
            self._runners = {s: interpreter.get_signature_runner(s) for s in TRAINABLE_SIGNATURES}
            train_x = self._runners["train"].get_input_details()["x"]
            infer_output = self._runners["infer"].get_output_details()["output"]
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ModelError(
                f"the trainable signatures lack an expected tensor: {exc}", reason="not_trainable"
            ) from exc
        self._interpreter = interpreter
        train_shape = tuple(int(d) for d in train_x["shape"])
        if train_shape[0] != batch_size:
            raise ConfigError(
                f"the model trains in batches of {train_shape[0]}, not {batch_size}",
                reason="bad_batch_size",
            )
        self._batch_size = batch_size
        self._input_shape = train_shape[1:]
        self._num_classes = int(infer_output["shape"][-1])
        initial = self.get_weights()
        self._shapes = [w.shape for w in initial]
        _log.info(
            "LiteRT trainer on %s %s: %d weight arrays, batch %d",
            runtime.name,
            runtime.version,
            len(initial),
            batch_size,
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def fixed_batch_size(self) -> int:
        return self._batch_size

    def _call(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        try:
            with self._lock:
                outputs = self._runners[signature](**inputs)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{signature} failed: {exc}", reason="invoke_failed") from exc
        # The runner may hand out views of interpreter buffers that the next call overwrites.
        return {name: np.array(value, copy=True) for name, value in outputs.items()}

    def get_weights(self) -> list[np.ndarray]:
        named = self._call("get_weights")
        return [named[k] for k in sorted(named, key=_weight_index)]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        arrays = self._check_weights(weights, self._shapes)
        self._call("set_weights", **{f"w{i}": a for i, a in enumerate(arrays)})

    def predict(self, x: np.ndarray) -> np.ndarray:
        inputs = self._check_inputs(x)
        parts = [
            self._call("infer", x=inputs[i : i + _PREDICT_CHUNK])["output"]
            for i in range(0, len(inputs), _PREDICT_CHUNK)
        ]
        return np.concatenate(parts, axis=0)

    def _make_step(self, config: TrainConfig, start: list[FloatArray]) -> _Step:
        lr = np.array(config.learning_rate, dtype=np.float32)
        pull = np.float32(config.learning_rate * config.proximal_mu)
        # The weights before the next step: known without asking, since we set them last.
        current = [w.copy() for w in start]
        size = self._batch_size

        def step(x: FloatArray, y: npt.NDArray[np.int32]) -> float:
            real = len(x)
            mask = np.zeros(size, dtype=np.float32)
            mask[:real] = 1.0
            if real < size:
                x = np.concatenate([x, np.zeros((size - real, *x.shape[1:]), np.float32)])
                y = np.concatenate([y, np.zeros(size - real, np.int32)])
            loss = self._call("train", x=x, y=y, mask=mask, lr=lr)["loss"]
            if pull > 0.0:
                after = self.get_weights()
                current[:] = [
                    a - pull * (c - g) for a, c, g in zip(after, current, start, strict=True)
                ]
                self.set_weights(current)
            return float(loss)

        return step


# --- Keras -----------------------------------------------------------------------------


def _import_tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_MIN_LOG_LEVEL)
    import tensorflow as tf

    return tf


def build_keras_model(name: str) -> keras.Model:
    """The named architecture with its seeded initial weights (re-seeds Keras globally)."""
    if name not in ARCHITECTURE_NAMES:
        keras_architecture(name, None)  # the ConfigError that names the known ones
    _import_tf()  # before Keras loads TensorFlow, so its log level applies
    import keras

    keras.utils.set_random_seed(_MODEL_SEED)
    return keras_architecture(name, keras)


class KerasTrainer(Trainer):
    """Trains a Keras model (softmax output, all weights trainable) with TensorFlow."""

    name: ClassVar[str] = "keras"

    def __init__(self, build_model: Callable[[], keras.Model]) -> None:
        self._tf = tf = _import_tf()
        import keras

        try:
            model = build_model()
        except (ValueError, TypeError, tf.errors.OpError) as exc:
            raise ModelError(f"cannot build the Keras model: {exc}", reason="bad_model") from exc
        if len(model.trainable_variables) != len(model.weights):
            raise ModelError(
                "only models whose weights are all trainable are supported",
                reason="unsupported_model",
            )
        self._model = model
        self._variables = list(model.trainable_variables)
        self._shapes = [tuple(int(d) for d in v.shape) for v in self._variables]
        self._input_shape = tuple(int(d) for d in model.input_shape[1:])
        self._num_classes = int(model.output_shape[-1])
        loss_fn = keras.losses.sparse_categorical_crossentropy

        def sgd_step(x: Any, y: Any, lr: Any, mu: Any, anchor: Sequence[Any]) -> Any:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(loss_fn(y, model(x, training=True)))
            grads = tape.gradient(loss, self._variables)
            # Both terms at the step's starting weights: plain SGD on loss + proximal term.
            updates = [
                lr * (g + mu * (v.value - a))
                for v, g, a in zip(self._variables, grads, anchor, strict=True)
            ]
            for variable, update in zip(self._variables, updates, strict=True):
                variable.assign_sub(update)
            return loss

        self._sgd_step = tf.function(sgd_step, reduce_retracing=True)

    @property
    def model(self) -> keras.Model:
        return self._model

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def get_weights(self) -> list[np.ndarray]:
        return [np.asarray(w, dtype=np.float32) for w in self._model.get_weights()]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        self._model.set_weights(self._check_weights(weights, self._shapes))

    def predict(self, x: np.ndarray) -> np.ndarray:
        inputs = self._check_inputs(x)
        parts = [
            np.asarray(self._model(inputs[i : i + _PREDICT_CHUNK], training=False))
            for i in range(0, len(inputs), _PREDICT_CHUNK)
        ]
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False)

    def _make_step(self, config: TrainConfig, start: list[FloatArray]) -> _Step:
        tf = self._tf
        lr = tf.constant(config.learning_rate, tf.float32)
        mu = tf.constant(config.proximal_mu, tf.float32)
        anchor = [tf.constant(w) for w in start]

        def step(x: FloatArray, y: npt.NDArray[np.int32]) -> float:
            try:
                loss = self._sgd_step(x, y, lr, mu, anchor)
            except tf.errors.OpError as exc:
                raise ModelError(f"training step failed: {exc}", reason="train_failed") from exc
            return float(loss)

        return step


# --- choosing a backend ------------------------------------------------------------------


def _module_available(name: str) -> bool:
    # find_spec locates a top-level module without importing it.
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_trainers() -> list[str]:
    """The trainer kinds this machine can run, cheaply checked (nothing is imported).

    ``"litert"`` needs any TFLite interpreter (LiteRT, tflite-runtime or TensorFlow);
    ``"keras"`` needs TensorFlow and Keras.
    """
    kinds = []
    if any(_module_available(m) for m in ("ai_edge_litert", "tflite_runtime", "tensorflow")):
        kinds.append("litert")
    if _module_available("tensorflow") and _module_available("keras"):
        kinds.append("keras")
    return kinds


def make_trainer(
    kind: str,
    *,
    trainable_tflite: bytes | None = None,
    model_name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Trainer:
    """A trainer of ``kind`` (one of :data:`TRAINER_KINDS`).

    ``"litert"`` trains ``trainable_tflite`` (batch ``batch_size``); ``"keras"`` builds the
    architecture ``model_name`` (one of ``runtime.architectures.ARCHITECTURE_NAMES``) with its
    initial weights.
    """
    if kind not in TRAINER_KINDS:
        raise ConfigError(
            f"unknown trainer {kind!r}; choose one of {', '.join(TRAINER_KINDS)}",
            reason="bad_trainer",
        )
    if kind not in available_trainers():
        raise ConfigError(f"the {kind} trainer cannot run here", reason="trainer_unavailable")
    if kind == "litert":
        if trainable_tflite is None:
            raise ConfigError("the litert trainer needs a trainable .tflite", reason="bad_trainer")
        return LiteRTTrainer(trainable_tflite, batch_size=batch_size)
    if model_name is None:
        raise ConfigError("the keras trainer needs a model name", reason="bad_trainer")
    if model_name not in ARCHITECTURE_NAMES:  # an unknown name fails before TensorFlow loads
        keras_architecture(model_name, None)
    return KerasTrainer(lambda: build_keras_model(model_name))
