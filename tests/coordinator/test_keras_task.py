"""The ``keras`` recipe's task file: a good model loads, each mistake is one line."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from coordinator.fleet import AgentInfo
from coordinator.keras_task import KerasTaskProducer
from coordinator.selection import trainer_mismatch
from coordinator.state import CoordinatorState
from coordinator.tasks import load_task
from fedge.cli import cli
from protocol.errors import ConfigError
from protocol.tasks import KerasRecipe

TASK = """
name = "small"
labels = ["a", "b", "c"]
[recipe]
kind = "keras"
model = "model.keras"
[preprocess]
height = 8
width = 8
"""


def _keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def _model(*, classes: int = 3, side: int = 8, batch_norm: bool = False, last: str = "softmax"):  # type: ignore[no-untyped-def]
    keras = _keras()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    norm = [layers.BatchNormalization()] if batch_norm else []
    return keras.Sequential(
        [
            keras.Input((side, side, 3)),
            layers.Conv2D(4, 3, activation="relu"),
            *norm,
            layers.Conv2D(4, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(classes, activation=last),
        ]
    )


def _save(model: Any, path: Path) -> None:
    with warnings.catch_warnings():
        # Keras 3's saver calls np.array(variable, copy=False), which numpy 2 deprecates.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        model.save(path)


def _task(tmp_path: Path, model: Any, text: str = TASK) -> Path:
    _save(model, tmp_path / "model.keras")
    path = tmp_path / "task.toml"
    path.write_text(text)
    return path


def test_a_keras_task_loads_and_says_litert_can_train_it(tmp_path: Path) -> None:
    task = load_task(_task(tmp_path, _model()))
    assert isinstance(task.spec.recipe, KerasRecipe)
    assert task.keras is not None
    assert (task.keras.input_shape, task.keras.classes) == ((8, 8, 3), 3)
    assert task.keras.litert_refusal is None


def test_a_model_litert_cannot_train_loads_with_the_reason(tmp_path: Path) -> None:
    task = load_task(_task(tmp_path, _model(batch_norm=True)))
    assert task.keras is not None
    assert task.keras.litert_refusal is not None
    assert "BatchNormalization" in task.keras.litert_refusal
    producer = KerasTaskProducer(
        task=task.spec, info=task.keras, state=CoordinatorState(tmp_path / "state.db")
    )
    release, blobs = producer.release(
        version="r0", round_number=0, weights=producer.initial_weights(), metrics=None
    )
    assert release.trainers == ("keras",)
    assert release.keras_model is not None
    assert release.trainable.sha256 == release.keras_model.sha256
    assert [v.name for v in release.variants] == ["float32"]
    assert set(blobs) == {release.weights.sha256, release.keras_model.sha256} | {
        v.blob.sha256 for v in release.variants
    }
    litert_only = AgentInfo("a", online=True, can_train=True, trainers=("litert",))
    both = AgentInfo("b", online=True, can_train=True, trainers=("litert", "keras"))
    why = trainer_mismatch(litert_only, release)
    assert why is not None
    assert why.startswith("it trains with litert only; this model needs keras (layer ")
    assert trainer_mismatch(both, release) is None


def _rename_a_layer_class(path: Path, new_class: str) -> None:
    """The .keras archive with its Dense layer's class renamed in config.json."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "Dense":
            layer["class_name"] = new_class
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_an_unknown_layer_is_one_line(tmp_path: Path) -> None:
    path = _task(tmp_path, _model())
    _rename_a_layer_class(tmp_path / "model.keras", "FancyAttention")
    with pytest.raises(ConfigError) as caught:
        load_task(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    assert "recipe.model" in lines[0]
    assert "unknown layer 'FancyAttention'" in lines[0]
    assert caught.value.reason == "bad_task"


def test_labels_shape_and_softmax_mismatches_are_one_line_each(tmp_path: Path) -> None:
    path = _task(tmp_path, _model(classes=4, side=10, last="linear"))
    with pytest.raises(ConfigError) as caught:
        load_task(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3, lines
    assert "the model has 4 outputs, the task names 3 labels" in lines[0]
    assert "the model takes 10x10x3 inputs, the spec makes 8x8x3" in lines[1]
    assert "must end in softmax" in lines[2]


def test_a_missing_or_broken_model_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "task.toml"
    path.write_text(TASK)
    with pytest.raises(ConfigError, match=r"recipe.model: cannot read .*model.keras"):
        load_task(path)
    (tmp_path / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match=r"not a loadable .keras model") as caught:
        load_task(path)
    assert len(str(caught.value).splitlines()) == 1


def test_coordinator_run_refuses_an_unknown_layer_with_one_line(tmp_path: Path) -> None:
    path = _task(tmp_path, _model())
    _rename_a_layer_class(tmp_path / "model.keras", "FancyAttention")
    result = CliRunner().invoke(
        cli, ["coordinator", "run", "--task", str(path), "--data-dir", str(tmp_path / "d")]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "task.toml" in line]
    assert len(errors) == 1, result.output
    assert "unknown layer 'FancyAttention'" in errors[0]
    assert "Traceback" not in result.output
