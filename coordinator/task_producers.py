"""The model producer for a task: one per recipe.

A ``transfer`` release carries the backbone ``.tflite`` as its ``trainable`` blob (the same
bytes every round, so agents fetch it once) and the head's weights as its ``weights``. Its
serving variants are single ``.tflite`` files that run backbone, pooling and head in one
invoke, composed at the flatbuffer level (:mod:`runtime.composition`), so any third-party
backbone works: from a float backbone a ``float32`` model and its ``int8`` quantisation
(:mod:`coordinator.variants`); from an int8 backbone the composed model is the ``int8`` one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.production import KerasModelProducer, blob_ref
from coordinator.reference import load_digits_split
from coordinator.rounds import ModelProducer
from coordinator.state import CoordinatorState
from coordinator.tasks import BackboneInfo, LoadedTask
from coordinator.variants import serving_variants
from protocol.chunks import DEFAULT_MAX_CHUNK_BYTES
from protocol.errors import ConfigError
from protocol.messages.rounds import ModelMetrics, ModelRelease, ModelVariant
from protocol.tasks import BuiltinRecipe, KerasRecipe, SplitRecipe, TaskSpec, TransferRecipe
from protocol.updates import encode_weights
from runtime.composition import Head, compose
from runtime.merging import without_record

__all__ = ["TransferProducer", "head_initial_weights", "make_producer", "transfer_serving_variants"]

_FLOAT_INPUTS = ("float32",)


def head_initial_weights(
    features: int, hidden: Sequence[int], classes: int, *, seed: int
) -> list[np.ndarray]:
    """Glorot-uniform kernels and zero biases, as Keras's Dense starts; seeded."""
    rng = np.random.default_rng(seed)
    sizes = [features, *hidden, classes]
    weights: list[np.ndarray] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights.append(rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32))
        weights.append(np.zeros(fan_out, np.float32))
    return weights


def transfer_serving_variants(
    task: TaskSpec, backbone: BackboneInfo, weights: Sequence[np.ndarray]
) -> list[tuple[dict[str, Any], bytes]]:
    """The release's one-invoke serving models: (fields of its ModelVariant but the blob, bytes).

    The coordinator holds no images of a user's task, so the int8 quantisation of a float
    backbone's model is dynamic-range (int8 weights, float activations) and no variant has
    a central accuracy; agents evaluate.
    """
    head = Head(task.name, tuple(np.asarray(w, np.float32) for w in weights), task.labels)
    composed = compose(backbone.content, [head])
    if backbone.input_dtype not in _FLOAT_INPUTS:
        fields = {"name": "int8", "quantization": "int8_static", "evaluated_on": 0}
        return [(fields, composed)]
    empty = np.zeros((0, *backbone.input_shape), np.float32)
    variants = serving_variants(
        composed, agent_ranges=None, eval_x=empty, eval_y=np.zeros(0, np.int64), central=False
    )
    # A quantiser keeps the composition record, which speaks of float kernels: only the
    # float model keeps it (a merge takes float models).
    return [
        (fields, data if fields["name"] == "float32" else without_record(data))
        for fields, data in variants
    ]


class TransferProducer(ModelProducer):
    """Releases of a transfer task: the backbone blob and the head's weights."""

    def __init__(
        self,
        *,
        task: TaskSpec,
        backbone: BackboneInfo,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        assert isinstance(task.recipe, TransferRecipe)
        self._task = task
        self._recipe = task.recipe
        self._backbone = backbone
        self._max_chunk_bytes = max_chunk_bytes

    def initial_weights(self) -> list[np.ndarray]:
        return head_initial_weights(
            self._backbone.feature_size,
            self._recipe.hidden_units,
            len(self._task.labels),
            seed=self._recipe.head_seed,
        )

    def evaluate(self, weights: Sequence[np.ndarray]) -> ModelMetrics:  # noqa: ARG002
        # The coordinator holds no data of a user's task; agents evaluate.
        return ModelMetrics()

    def release(
        self,
        *,
        version: str,
        round_number: int,
        weights: Sequence[np.ndarray],
        metrics: ModelMetrics | None,
    ) -> tuple[ModelRelease, dict[str, bytes]]:
        head = encode_weights([np.asarray(w, np.float32) for w in weights])
        backbone = self._backbone.content
        size = self._max_chunk_bytes
        head_ref = blob_ref(
            head, content_type="application/vnd.fedge.tensors", max_chunk_bytes=size
        )
        backbone_ref = blob_ref(
            backbone, content_type="application/vnd.tflite", max_chunk_bytes=size
        )
        variants = transfer_serving_variants(self._task, self._backbone, weights)
        refs = [
            blob_ref(data, content_type="application/vnd.tflite", max_chunk_bytes=size)
            for _, data in variants
        ]
        release = ModelRelease(
            version=version,
            model_name=self._task.name,
            recipe="transfer",
            round=round_number,
            weights=head_ref,
            trainable=backbone_ref,
            labels=self._task.labels,
            preprocess=self._task.preprocess,
            train_batch_size=self._task.training.batch_size,
            metrics=metrics,
            created_at=time.time(),
            variants=tuple(
                ModelVariant(**fields, blob=ref)
                for (fields, _), ref in zip(variants, refs, strict=True)
            ),
        )
        blobs = {head_ref.sha256: head, backbone_ref.sha256: backbone}
        blobs.update({ref.sha256: data for ref, (_, data) in zip(refs, variants, strict=True)})
        return release, blobs


def make_producer(
    task: LoadedTask, *, config: CoordinatorConfig, state: CoordinatorState
) -> ModelProducer:
    spec = task.spec
    recipe = spec.recipe
    if isinstance(recipe, BuiltinRecipe):
        split = load_digits_split()
        return KerasModelProducer(
            model_name=recipe.model,
            state=state,
            eval_x=split.x_test,
            eval_y=split.y_test,
            labels=spec.labels,
            preprocess=spec.preprocess,
            # A task file sets the batch; the built-in tasks keep the coordinator's setting.
            train_batch_size=(
                spec.training.batch_size if config.task is not None else config.train_batch_size
            ),
            max_chunk_bytes=config.max_chunk_bytes,
            with_inference_files=config.with_inference_files,
        )
    if isinstance(recipe, KerasRecipe):
        from coordinator.keras_task import KerasTaskProducer

        if task.keras is None:
            raise ConfigError(
                f"task {spec.name}: the keras recipe needs its model", reason="bad_task"
            )
        return KerasTaskProducer(
            task=spec, info=task.keras, state=state, max_chunk_bytes=config.max_chunk_bytes
        )
    if isinstance(recipe, SplitRecipe):
        # Checked at load (coordinator.split_task); its rounds are not driven by the daemon yet.
        raise ConfigError(
            f"task {spec.name}: a split task is checked but its rounds are not run by "
            "`fedge coordinator run` yet",
            reason="bad_task",
        )
    if task.backbone is None:
        raise ConfigError(
            f"task {spec.name}: the transfer recipe needs a backbone", reason="bad_task"
        )
    return TransferProducer(
        task=spec, backbone=task.backbone, max_chunk_bytes=config.max_chunk_bytes
    )
