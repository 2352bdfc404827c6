"""Reading and checking a task file; the built-in tasks.

:func:`load_task` reads a TOML task (see :mod:`protocol.tasks`), then checks what the schema
cannot: the backbone file is readable and is a ``.tflite`` with one image input that the
preprocessing spec feeds, a built-in model gets as many labels as it has classes, and so on.
Every mistake found becomes one line of the :class:`ConfigError` it raises, so the user
fixes them all at once.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from coordinator.reference import DIGITS_LABELS, digits_preprocess_spec
from protocol.errors import ConfigError
from protocol.preprocess import InputDType, PreprocessSpec
from protocol.tasks import (
    BUILTIN_MODELS,
    BuiltinRecipe,
    KerasRecipe,
    SplitRecipe,
    TaskSpec,
    TransferRecipe,
)

if TYPE_CHECKING:
    from coordinator.keras_task import KerasModelInfo
    from coordinator.split_task import SplitTaskInfo

__all__ = ["BackboneInfo", "LoadedTask", "builtin_task", "inspect_backbone", "load_task"]

_DIGITS_CLASSES = len(DIGITS_LABELS)


@dataclass(frozen=True, slots=True)
class BackboneInfo:
    """What the coordinator read from a backbone ``.tflite``."""

    content: bytes
    input_shape: tuple[int, int, int]
    input_dtype: str
    output_shapes: tuple[tuple[int, ...], ...]

    @property
    def feature_size(self) -> int:
        """Features per image: every output's last axis (spatial ones average-pooled), joined."""
        return sum(shape[-1] for shape in self.output_shapes)


@dataclass(frozen=True, slots=True)
class LoadedTask:
    spec: TaskSpec
    backbone: BackboneInfo | None = None
    keras: KerasModelInfo | None = None
    split: SplitTaskInfo | None = None


def builtin_task(model: str) -> LoadedTask:
    """The task of a model that ships with fedge: digits' labels and preprocessing."""
    if model not in BUILTIN_MODELS:
        raise ConfigError(
            f"unknown model {model!r}; known models: {', '.join(BUILTIN_MODELS)}",
            reason="unknown_model",
        )
    spec = TaskSpec(
        name=model,
        labels=DIGITS_LABELS,
        recipe=BuiltinRecipe(model=model),  # type: ignore[arg-type]
        preprocess=digits_preprocess_spec(),
    )
    return LoadedTask(spec)


def load_task(path: Path) -> LoadedTask:
    """Read and check ``path``; :class:`ConfigError` with one line per mistake."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"task file {path}: cannot read it: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"task file {path}: not valid TOML: {exc}") from exc
    try:
        # Through JSON: TOML arrays become tuples and strings become enums, as on the wire.
        spec = TaskSpec.model_validate_json(json.dumps(raw, default=str))
    except ValidationError as exc:
        lines = [
            f"{path}: {'.'.join(str(p) for p in error['loc']) or 'task'}: {error['msg']}"
            for error in exc.errors(include_input=False)
        ]
        raise ConfigError("\n".join(lines), reason="bad_task") from exc
    problems: list[str] = []
    backbone = None
    if isinstance(spec.recipe, BuiltinRecipe):
        problems += _check_builtin(spec)
    elif isinstance(spec.recipe, TransferRecipe):
        backbone_path = path.parent / spec.recipe.backbone
        try:
            backbone = inspect_backbone(backbone_path.read_bytes())
        except OSError as exc:
            problems.append(f"recipe.backbone: cannot read {backbone_path}: {exc.strerror}")
        except ConfigError as exc:
            problems.append(f"recipe.backbone: {backbone_path}: {exc}")
        else:
            problems += _check_feeds(spec.preprocess, backbone)
    keras = None
    if isinstance(spec.recipe, KerasRecipe):
        keras, found = _check_keras(spec, path.parent / spec.recipe.model)
        problems += found
    split = None
    if isinstance(spec.recipe, SplitRecipe):
        # Building and exporting the parts loads TensorFlow: only for this recipe.
        from coordinator.split_task import check_split_task

        split, found = check_split_task(spec, path.parent)
        problems += found
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems), reason="bad_task")
    return LoadedTask(spec, backbone, keras, split)


def _check_keras(spec: TaskSpec, model_path: Path) -> tuple[KerasModelInfo | None, list[str]]:
    # Loading a model loads TensorFlow: only for this recipe.
    from coordinator.keras_task import check_keras_task, inspect_keras_model

    try:
        info = inspect_keras_model(model_path.read_bytes())
    except OSError as exc:
        return None, [f"recipe.model: cannot read {model_path}: {exc.strerror}"]
    except ConfigError as exc:
        return None, [f"recipe.model: {model_path}: {exc}"]
    return info, check_keras_task(spec, info)


def _check_builtin(spec: TaskSpec) -> list[str]:
    problems = []
    if len(spec.labels) != _DIGITS_CLASSES:
        problems.append(
            f"labels: the built-in model has {_DIGITS_CLASSES} classes, "
            f"the task names {len(spec.labels)} labels"
        )
    expected = digits_preprocess_spec()
    shape = (spec.preprocess.height, spec.preprocess.width, spec.preprocess.channels)
    if shape != (expected.height, expected.width, expected.channels):
        problems.append(
            f"preprocess: the built-in model takes {expected.height}x{expected.width}x"
            f"{expected.channels} inputs, the spec makes {shape[0]}x{shape[1]}x{shape[2]}"
        )
    return problems


def _check_feeds(spec: PreprocessSpec, backbone: BackboneInfo) -> list[str]:
    problems = []
    made = (spec.height, spec.width, spec.channels)
    if made != backbone.input_shape:
        h, w, c = backbone.input_shape
        problems.append(
            f"preprocess: the backbone takes {h}x{w}x{c} images, "
            f"the spec makes {made[0]}x{made[1]}x{made[2]}"
        )
    if spec.dtype is not InputDType.FLOAT32:
        # The agent quantises from the backbone's own input parameters.
        problems.append("preprocess.dtype: leave it float32; the backbone's quantisation is used")
    return problems


def inspect_backbone(content: bytes) -> BackboneInfo:
    """The input and output shapes of a feature-extractor ``.tflite``.

    Raises :class:`ConfigError` unless it has one image input (1, h, w, c) and outputs of
    rank 2 (n, features) or 4 (n, h, w, features, pooled by the agent); several outputs are
    joined into one feature vector.
    """
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_content=content)
        interpreter.allocate_tensors()
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"not a usable .tflite model: {exc}", reason="bad_backbone") from exc
    if len(inputs) != 1 or not outputs:
        raise ConfigError(
            f"a backbone needs one input and outputs, it has {len(inputs)} and {len(outputs)}",
            reason="bad_backbone",
        )
    in_shape = tuple(int(d) for d in inputs[0]["shape"])
    out_shapes = tuple(tuple(int(d) for d in output["shape"]) for output in outputs)
    if len(in_shape) != 4 or in_shape[3] not in (1, 3):
        raise ConfigError(
            f"the backbone's input {in_shape} is not an image batch (n, h, w, 1 or 3)",
            reason="bad_backbone",
        )
    for out_shape in out_shapes:
        if len(out_shape) not in (2, 4):
            raise ConfigError(
                f"the backbone's output {out_shape} is neither features (n, k) nor a feature "
                "map (n, h, w, k)",
                reason="bad_backbone",
            )
    dtype = inputs[0]["dtype"]
    return BackboneInfo(
        content=content,
        input_shape=(in_shape[1], in_shape[2], in_shape[3]),
        input_dtype=getattr(dtype, "__name__", str(dtype)),
        output_shapes=out_shapes,
    )
