"""Model production with TensorFlow: initial weights, evaluation, releases and their blobs.

A release references content-addressed blobs: the weights (new every round), the
trainable ``.tflite`` (new only with the architecture; its ``infer`` signature also serves
inference on agents) and, when asked for, inference ``.tflite`` files (float32, int8).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.models import get_model_definition
from coordinator.rounds import ModelProducer
from coordinator.state import CoordinatorState
from coordinator.trainable_export import export_trainable_tflite
from coordinator.variants import merged_ranges_of_round, serving_variants
from protocol.chunks import CHUNK_HEADER_BYTES, DEFAULT_MAX_CHUNK_BYTES
from protocol.masks import sparsity
from protocol.messages.rounds import BlobRef, ModelMetrics, ModelRelease, ModelVariant
from protocol.preprocess import PreprocessSpec
from protocol.updates import encode_weights

__all__ = ["KerasModelProducer", "blob_ref"]

logger = logging.getLogger(__name__)

# A release this sparse (pruned training) also gets the variant in sparse storage.
PRUNED_VARIANT_SPARSITY = 0.1


def blob_ref(
    data: bytes, *, content_type: str, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> BlobRef:
    chunk_bytes = max_chunk_bytes - CHUNK_HEADER_BYTES
    return BlobRef(
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        chunk_count=-(-len(data) // chunk_bytes),
        chunk_bytes=chunk_bytes,
        content_type=content_type,
    )


class KerasModelProducer(ModelProducer):
    """Builds, evaluates and packages one registered model definition."""

    def __init__(
        self,
        *,
        model_name: str,
        state: CoordinatorState,
        eval_x: np.ndarray,
        eval_y: np.ndarray,
        labels: Sequence[str],
        preprocess: PreprocessSpec,
        train_batch_size: int = 16,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        with_inference_files: bool = False,
        central_calibration: bool = True,
    ) -> None:
        self.definition = get_model_definition(model_name)
        self._state = state
        self._eval_x = eval_x
        self._eval_y = eval_y
        self._labels = tuple(labels)
        self._preprocess = preprocess
        self._batch_size = train_batch_size
        self._max_chunk_bytes = max_chunk_bytes
        self._with_inference = with_inference_files
        # False: int8 is calibrated only from agents' ranges (dynamic-range without them).
        self._central_calibration = central_calibration
        self._model: Any = None
        self._trainable: bytes | None = None

    def _keras(self) -> Any:
        if self._model is None:
            self._model = self.definition.build_keras()
        return self._model

    def initial_weights(self) -> list[np.ndarray]:
        return [np.asarray(w, np.float32) for w in self._keras().get_weights()]

    def evaluate(self, weights: Sequence[np.ndarray]) -> ModelMetrics:
        model = self._keras()
        model.set_weights(list(weights))
        # Called directly, not through predict(): predict builds a data pipeline per call,
        # hundreds of milliseconds a round for a few hundred small images.
        x = self._eval_x
        probabilities = np.concatenate(
            [np.asarray(model(x[i : i + 256], training=False)) for i in range(0, len(x), 256)]
        )
        picked = probabilities[np.arange(len(self._eval_y)), self._eval_y]
        loss = float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))
        accuracy = float(np.mean(np.argmax(probabilities, axis=1) == self._eval_y))
        return ModelMetrics(accuracy=accuracy, loss=loss, evaluated_on=len(self._eval_y))

    def trainable_tflite(self) -> bytes:
        """Exported once; kept in the state so a restart publishes the same bytes."""
        if self._trainable is None:
            key = f"trainable:{self.definition.name}:{self._batch_size}"
            digest = self._state.get(key)
            if digest is not None:
                self._trainable = self._state.blob(digest)
            else:
                started = time.perf_counter()
                self._trainable = export_trainable_tflite(
                    self.definition, batch_size=self._batch_size
                )
                digest = hashlib.sha256(self._trainable).hexdigest()
                self._state.put_blob(digest, self._trainable)
                self._state.put(key, digest)
                logger.info(
                    "trainable model %s exported in %.1f s (%d bytes)",
                    self.definition.name,
                    time.perf_counter() - started,
                    len(self._trainable),
                )
        return self._trainable

    def release(
        self,
        *,
        version: str,
        round_number: int,
        weights: Sequence[np.ndarray],
        metrics: ModelMetrics | None,
    ) -> tuple[ModelRelease, dict[str, bytes]]:
        weights_blob = encode_weights([np.asarray(w, np.float32) for w in weights])
        trainable = self.trainable_tflite()
        blobs = {
            "weights": (weights_blob, "application/vnd.fedge.tensors"),
            "trainable": (trainable, "application/vnd.tflite"),
        }
        variants: list[tuple[dict[str, Any], bytes]] = []
        if self._with_inference:
            from coordinator.serving_files import export_serving_tflite, export_sparse_tflite
            from coordinator.tflite_export import export_int8_tflite

            model = self._keras()
            model.set_weights(list(weights))
            float_model = export_serving_tflite(model)
            blobs["inference"] = (float_model, "application/vnd.tflite")
            pruned = sparsity(weights) >= PRUNED_VARIANT_SPARSITY
            variants = serving_variants(
                float_model,
                agent_ranges=merged_ranges_of_round(self._state, round_number, float_model),
                eval_x=self._eval_x,
                eval_y=self._eval_y,
                central=self._central_calibration,
                weights=weights,
                sparse_tflite=export_sparse_tflite(model) if pruned else None,
            )
            blobs.update({v["name"]: (data, "application/vnd.tflite") for v, data in variants})
            blobs["inference_int8"] = (
                export_int8_tflite(model, self._eval_x),
                "application/vnd.tflite",
            )
        refs = {
            name: blob_ref(data, content_type=kind, max_chunk_bytes=self._max_chunk_bytes)
            for name, (data, kind) in blobs.items()
        }
        release = ModelRelease(
            version=version,
            model_name=self.definition.name,
            round=round_number,
            weights=refs["weights"],
            trainable=refs["trainable"],
            inference=refs.get("inference"),
            inference_int8=refs.get("inference_int8"),
            labels=self._labels,
            preprocess=self._preprocess,
            train_batch_size=self._batch_size,
            metrics=metrics,
            created_at=time.time(),
            variants=tuple(ModelVariant(**v, blob=refs[v["name"]]) for v, _ in variants),
        )
        return release, {refs[name].sha256: data for name, (data, _) in blobs.items()}
