"""``fedge model merge``: serving models that share a backbone become one multi-head model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from agent.head import HeadTrainer
from agent.runtime import TfliteModel
from agent.transfer_task import Backbone
from coordinator.task_producers import head_initial_weights
from coordinator.tflite_export import export_float_tflite
from fedge.cli import cli
from runtime.composition import Head, compose

FLOAT_TOLERANCE = 1e-5


def _pooled_cnn(seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))  # (n, 6) features


@pytest.fixture(scope="module")
def backbones() -> tuple[bytes, bytes]:
    return export_float_tflite(_pooled_cnn(0)), export_float_tflite(_pooled_cnn(1))


def _task(backbone: bytes, name: str, labels: tuple[str, ...], path: Path) -> Head:
    head = Head(name, tuple(head_initial_weights(6, (4,), len(labels), seed=len(name))), labels)
    path.write_bytes(compose(backbone, [head]))
    return head


def _merge(*models: Path, out: Path) -> Any:
    return CliRunner().invoke(cli, ["model", "merge", *map(str, models), "--out", str(out)])


def test_merge_writes_one_model_whose_outputs_are_every_task_s(
    tmp_path: Path, backbones: tuple[bytes, bytes]
) -> None:
    backbone, _ = backbones
    door = _task(backbone, "door", ("empty", "person", "parcel"), tmp_path / "door.tflite")
    birds = _task(backbone, "birds", ("none", "bird"), tmp_path / "birds.tflite")
    out = tmp_path / "both.tflite"
    result = _merge(tmp_path / "door.tflite", tmp_path / "birds.tflite", out=out)
    assert result.exit_code == 0, result.output
    assert "2 outputs" in result.output
    assert "door: empty, person, parcel" in result.output
    model = TfliteModel.from_bytes(out.read_bytes())
    # Outputs are named after their tasks (LiteRT lists a signature's outputs by name).
    names = [o.name for o in model.output_details]
    assert sorted(names) == ["birds", "door"]
    x = np.random.default_rng(0).uniform(0, 1, (5, 12, 12, 3)).astype(np.float32)
    features = Backbone(backbone).embed(x)
    outputs = [model.predict(sample[None]) for sample in x]
    for head in (door, birds):
        got = np.concatenate([o[names.index(head.name)] for o in outputs])
        expected = HeadTrainer(list(head.weights)).predict(features)
        np.testing.assert_allclose(got, expected, atol=FLOAT_TOLERANCE)


def test_models_without_a_shared_backbone_get_one_clear_line(
    tmp_path: Path, backbones: tuple[bytes, bytes]
) -> None:
    first, second = backbones
    _task(first, "door", ("empty", "person"), tmp_path / "door.tflite")
    _task(second, "birds", ("none", "bird"), tmp_path / "birds.tflite")
    out = tmp_path / "both.tflite"
    result = _merge(tmp_path / "door.tflite", tmp_path / "birds.tflite", out=out)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: these models share no backbone")
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not out.exists()
