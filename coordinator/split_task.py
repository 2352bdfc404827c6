"""The ``split`` recipe, checked at start: the model, its cut and the parts the agents run.

:func:`check_split_task` builds the named architecture or loads the ``.keras`` file, resolves
the cut (and a U-shaped task's top cut) from a layer index or name, and exports the parts the
agents will run (:mod:`coordinator.split_model`, :mod:`coordinator.split_ushape`) at the task's
batch size, so a lower part that cannot be made of builtin ops only is found before any round,
not on the first agent. Every mistake is one line, as :mod:`coordinator.tasks` collects them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError, FedgeError
from protocol.tasks import SplitRecipe, TaskSpec

__all__ = ["SplitTaskInfo", "check_split_task", "resolve_layer"]


@dataclass(frozen=True, slots=True)
class SplitTaskInfo:
    """A checked split task: the whole Keras model, the cut(s) and the agents' ``.tflite``."""

    model: Any
    cut: int
    top: int | None
    lower: bytes
    top_part: bytes | None


def resolve_layer(model: Any, ref: int | str, key: str) -> int:
    """A layer index from an index or a name; :class:`ConfigError` (one line) otherwise."""
    layers = model.layers
    if isinstance(ref, str):
        names = [layer.name for layer in layers]
        if ref not in names:
            raise ConfigError(
                f"{key}: the model has no layer {ref!r}; its layers: {', '.join(names)}",
                reason="bad_cut",
            )
        ref = names.index(ref)
    if not 0 < ref < len(layers):
        raise ConfigError(
            f"{key}: {ref} is out of range: the model has {len(layers)} layers, "
            f"a cut lies between 1 and {len(layers) - 1}",
            reason="bad_cut",
        )
    return ref


def _model(recipe: SplitRecipe, base: Path) -> tuple[Any, list[str]]:
    from coordinator.keras_task import inspect_keras_model
    from coordinator.trainable import import_tf
    from runtime.architectures import ARCHITECTURE_NAMES, keras_architecture

    if recipe.model in ARCHITECTURE_NAMES:
        import_tf()
        import keras

        return keras_architecture(recipe.model, keras), []
    path = base / recipe.model
    if path.suffix != ".keras":
        known = ", ".join(ARCHITECTURE_NAMES)
        return None, [f"recipe.model: {recipe.model!r} is neither a .keras file nor one of {known}"]
    try:
        return inspect_keras_model(path.read_bytes()).model, []
    except OSError as exc:
        return None, [f"recipe.model: cannot read {path}: {exc.strerror}"]
    except ConfigError as exc:
        return None, [f"recipe.model: {path}: {exc}"]


def _fits(spec: TaskSpec, model: Any) -> list[str]:
    problems = []
    classes = int(model.output_shape[-1])
    if classes != len(spec.labels):
        problems.append(
            f"labels: the model has {classes} outputs, the task names {len(spec.labels)} labels"
        )
    shape = tuple(int(d) for d in model.input_shape[1:])
    made = (spec.preprocess.height, spec.preprocess.width, spec.preprocess.channels)
    if shape != made:
        problems.append(
            f"preprocess: the model takes {'x'.join(map(str, shape))} inputs, "
            f"the spec makes {'x'.join(map(str, made))}"
        )
    return problems


def check_split_task(spec: TaskSpec, base: Path) -> tuple[SplitTaskInfo | None, list[str]]:
    """The checked split task of ``spec`` (paths relative to ``base``), or its problems."""
    from coordinator.split_model import export_lower_tflite
    from coordinator.split_ushape import export_top_tflite

    recipe = spec.recipe
    assert isinstance(recipe, SplitRecipe)
    model, problems = _model(recipe, base)
    if model is None:
        return None, problems
    problems += _fits(spec, model)
    if recipe.top is not None and not recipe.u_shaped:
        problems.append("recipe.top: only a u_shaped split has a top cut; set u_shaped = true")
    cut = top = None
    try:
        cut = resolve_layer(model, recipe.cut, "recipe.cut")
    except ConfigError as exc:
        problems.append(str(exc))
    if recipe.u_shaped:
        try:
            top = resolve_layer(model, recipe.top or len(model.layers) - 1, "recipe.top")
        except ConfigError as exc:
            problems.append(str(exc))
        if cut is not None and top is not None and top <= cut:
            problems.append(f"recipe.top: the top cut {top} must lie after the cut {cut}")
    if problems or cut is None:
        return None, problems
    batch = spec.training.batch_size
    try:
        lower = export_lower_tflite(model, cut, batch_size=batch)
    except FedgeError as exc:
        return None, [f"recipe.cut: the layers below {cut} cannot run on LiteRT-only agents: {exc}"]
    top_part = None
    if top is not None:
        try:
            top_part = export_top_tflite(model, top, batch_size=batch)
        except FedgeError as exc:
            return None, [f"recipe.top: the layers from {top} cannot run on the agents: {exc}"]
    return SplitTaskInfo(model, cut, top, lower, top_part), []
