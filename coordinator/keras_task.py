"""The ``keras`` recipe: the user's own ``.keras`` model, checked at start, released each round.

:func:`inspect_keras_model` loads the file (Keras's safe mode: no code from the file runs) and
finds whether LiteRT-only agents can train it: every layer must have a builtin-only training
graph (:mod:`coordinator.trainable_layers`). :class:`KerasTaskProducer` then releases, every
round, the weights, the ``.keras`` file (for agents that train in Keras; the same bytes every
round, so fetched once) and either the trainable ``.tflite`` (any agent trains it, its
``infer`` serves) or, when LiteRT cannot train the model, a float32 serving ``.tflite`` and
``trainers = ("keras",)``, with the reason, so only agents with TensorFlow are selected.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.production import blob_ref
from coordinator.rounds import ModelProducer
from coordinator.selection import MAX_REASON_CHARS
from coordinator.state import CoordinatorState
from coordinator.trainable import TRAINABLE_SIGNATURES, build_trainable_module, import_tf
from coordinator.trainable_export import convert_module
from coordinator.trainable_layers import Translator
from protocol.chunks import DEFAULT_MAX_CHUNK_BYTES
from protocol.errors import ConfigError, FedgeError
from protocol.messages.rounds import ModelMetrics, ModelRelease, ModelVariant
from protocol.tasks import TaskSpec
from protocol.updates import encode_weights
from runtime.architectures import load_keras_file

__all__ = ["KerasModelInfo", "KerasTaskProducer", "check_keras_task", "inspect_keras_model"]

_log = logging.getLogger(__name__)

KERAS_CONTENT_TYPE = "application/vnd.keras"
# How Keras says it has no class of a name: a custom one, or a name under keras.layers.
_UNKNOWN_CLASS = re.compile(
    r"Could not locate class '([^']+)'|Could not deserialize '(?:[\w.]+\.)?(\w+)' because"
)
_MAX_MESSAGE_CHARS = 300


@dataclass(frozen=True, slots=True)
class KerasModelInfo:
    """What the coordinator read from a ``.keras`` file."""

    content: bytes = field(repr=False)
    model: Any = field(repr=False, compare=False)
    input_shape: tuple[int, ...]
    classes: int
    # Why LiteRT-only agents cannot train it; None when they can (as far as the layers go).
    litert_refusal: str | None


def _load(content: bytes) -> Any:
    import_tf()  # before Keras loads TensorFlow, so its log level applies
    import keras

    return load_keras_file(content, keras)


def inspect_keras_model(content: bytes) -> KerasModelInfo:
    """Load a ``.keras`` file; :class:`ConfigError` (one line) when Keras cannot build it."""
    try:
        model = _load(content)
    # Keras raises TypeError for unknown classes, ValueError for bad configs and archives.
    except Exception as exc:
        unknown = _UNKNOWN_CLASS.search(str(exc))
        if unknown is not None:
            name = unknown.group(1) or unknown.group(2)
            raise ConfigError(
                f"unknown layer {name!r}: Keras cannot build it (only Keras's own layers "
                "load; a file's custom code is never run)",
                reason="unknown_layer",
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"not a loadable .keras model: {first[:_MAX_MESSAGE_CHARS]}", reason="bad_model"
        ) from exc
    try:
        Translator(model).run()
        refusal = None
    except FedgeError as exc:
        refusal = str(exc)[:MAX_REASON_CHARS]
    inputs, outputs = getattr(model, "inputs", []), getattr(model, "outputs", [])
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(
            f"a task model needs one input and one output, it has {len(inputs)} and {len(outputs)}",
            reason="bad_model",
        )
    return KerasModelInfo(
        content=content,
        model=model,
        input_shape=tuple(int(d) for d in model.input_shape[1:]),
        classes=int(model.output_shape[-1]),
        litert_refusal=refusal,
    )


def check_keras_task(spec: TaskSpec, info: KerasModelInfo) -> list[str]:
    """What does not fit between the task and its model, one line each."""
    problems = []
    if info.classes != len(spec.labels):
        problems.append(
            f"labels: the model has {info.classes} outputs, the task names "
            f"{len(spec.labels)} labels"
        )
    made = (spec.preprocess.height, spec.preprocess.width, spec.preprocess.channels)
    if info.input_shape != made:
        problems.append(
            f"preprocess: the model takes {'x'.join(map(str, info.input_shape))} inputs, "
            f"the spec makes {'x'.join(map(str, made))}"
        )
    last = info.model.layers[-1] if info.model.layers else None
    activation = getattr(getattr(last, "activation", None), "__name__", None)
    if activation != "softmax":
        problems.append("recipe.model: the model's last layer must end in softmax")
    return problems


class KerasTaskProducer(ModelProducer):
    """Releases of a ``keras`` task; the coordinator holds no data of it, agents evaluate."""

    def __init__(
        self,
        *,
        task: TaskSpec,
        info: KerasModelInfo,
        state: CoordinatorState,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        self._task = task
        self._info = info
        self._state = state
        self._max_chunk_bytes = max_chunk_bytes
        self._trainable, self.litert_refusal = self._trainable_tflite()
        if self.litert_refusal is not None:
            _log.warning(
                "task %s: LiteRT-only agents cannot train this model, only agents with "
                "TensorFlow will be selected: %s",
                task.name,
                self.litert_refusal,
            )

    def _trainable_tflite(self) -> tuple[bytes | None, str | None]:
        """Exported once and kept in the state, so a restart publishes the same bytes."""
        if self._info.litert_refusal is not None:
            return None, self._info.litert_refusal
        batch = self._task.training.batch_size
        model_digest = hashlib.sha256(self._info.content).hexdigest()
        key = f"trainable:keras:{model_digest}:{batch}"
        digest = self._state.get(key)
        if digest is not None:
            return self._state.blob(digest), None
        started = time.perf_counter()
        try:
            module = build_trainable_module(self._info.model, batch_size=batch)
            flatbuffer = convert_module(
                module, TRAINABLE_SIGNATURES, f"trainable {self._task.name}"
            )
        except FedgeError as exc:
            return None, str(exc)[:MAX_REASON_CHARS]
        digest = hashlib.sha256(flatbuffer).hexdigest()
        self._state.put_blob(digest, flatbuffer)
        self._state.put(key, digest)
        _log.info(
            "trainable model of task %s exported in %.1f s (%d bytes)",
            self._task.name,
            time.perf_counter() - started,
            len(flatbuffer),
        )
        return flatbuffer, None

    def initial_weights(self) -> list[np.ndarray]:
        return [np.asarray(w, np.float32) for w in self._info.model.get_weights()]

    def evaluate(self, weights: Sequence[np.ndarray]) -> ModelMetrics:  # noqa: ARG002
        return ModelMetrics()

    def release(
        self,
        *,
        version: str,
        round_number: int,
        weights: Sequence[np.ndarray],
        metrics: ModelMetrics | None,
    ) -> tuple[ModelRelease, dict[str, bytes]]:
        blobs: dict[str, tuple[bytes, str]] = {
            "weights": (
                encode_weights([np.asarray(w, np.float32) for w in weights]),
                "application/vnd.fedge.tensors",
            ),
            "keras": (self._info.content, KERAS_CONTENT_TYPE),
        }
        if self._trainable is not None:
            blobs["trainable"] = (self._trainable, "application/vnd.tflite")
        else:
            from coordinator.serving_files import export_serving_tflite

            # Nothing for LiteRT to train: agents serve a plain float32 model instead.
            model = self._info.model
            model.set_weights([np.asarray(w, np.float32) for w in weights])
            blobs["float32"] = (export_serving_tflite(model), "application/vnd.tflite")
        refs = {
            name: blob_ref(data, content_type=kind, max_chunk_bytes=self._max_chunk_bytes)
            for name, (data, kind) in blobs.items()
        }
        variants: tuple[ModelVariant, ...] = ()
        if "float32" in refs:
            parameters = int(sum(np.asarray(w).size for w in weights))
            variants = (
                ModelVariant(
                    name="float32",
                    blob=refs["float32"],
                    quantization="float32",
                    parameters=parameters,
                ),
            )
        release = ModelRelease(
            version=version,
            model_name=self._task.name,
            recipe="keras",
            round=round_number,
            weights=refs["weights"],
            # Without a trainable .tflite the field carries the .keras file (agents that
            # could only train a .tflite are never selected for such a release).
            trainable=refs.get("trainable", refs["keras"]),
            keras_model=refs["keras"],
            trainers=("litert", "keras") if self._trainable is not None else ("keras",),
            litert_refusal=self.litert_refusal,
            labels=self._task.labels,
            preprocess=self._task.preprocess,
            train_batch_size=self._task.training.batch_size,
            metrics=metrics,
            created_at=time.time(),
            variants=variants,
        )
        return release, {refs[name].sha256: data for name, (data, _) in blobs.items()}
