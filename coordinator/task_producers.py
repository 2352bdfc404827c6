"""The model producer for a task: one per recipe."""

from __future__ import annotations

from coordinator.config import CoordinatorConfig
from coordinator.production import KerasModelProducer
from coordinator.reference import load_digits_split
from coordinator.rounds import ModelProducer
from coordinator.state import CoordinatorState
from coordinator.tasks import LoadedTask
from protocol.errors import ConfigError
from protocol.tasks import BuiltinRecipe

__all__ = ["make_producer"]


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
    raise ConfigError(f"recipe {recipe.kind!r} has no producer", reason="bad_task")
