"""The model producer for a task: one per recipe.

A ``transfer`` release carries the backbone ``.tflite`` as its ``trainable`` blob (the same
bytes every round, so agents fetch it once) and the head's weights as its ``weights``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.production import KerasModelProducer, blob_ref
from coordinator.reference import load_digits_split
from coordinator.rounds import ModelProducer
from coordinator.state import CoordinatorState
from coordinator.tasks import BackboneInfo, LoadedTask
from protocol.chunks import DEFAULT_MAX_CHUNK_BYTES
from protocol.errors import ConfigError
from protocol.messages.rounds import ModelMetrics, ModelRelease
from protocol.tasks import BuiltinRecipe, TaskSpec, TransferRecipe
from protocol.updates import encode_weights

__all__ = ["TransferProducer", "head_initial_weights", "make_producer"]


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
        )
        return release, {head_ref.sha256: head, backbone_ref.sha256: backbone}


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
    if task.backbone is None:
        raise ConfigError(
            f"task {spec.name}: the transfer recipe needs a backbone", reason="bad_task"
        )
    return TransferProducer(
        task=spec, backbone=task.backbone, max_chunk_bytes=config.max_chunk_bytes
    )
