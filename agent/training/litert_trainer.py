"""Training inside LiteRT: a trainable ``.tflite``, no TensorFlow needed."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from agent.runtime import load_interpreter_class
from protocol.errors import ConfigError, ModelError

if TYPE_CHECKING:
    pass

from agent.training.base import (
    _PREDICT_CHUNK,
    _TF_DEPRECATION_WARNING,
    _WEIGHT_NAME,
    TRAINABLE_SIGNATURES,
    FloatArray,
    TrainConfig,
    Trainer,
    _Step,
)

_log = logging.getLogger(__name__)


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
