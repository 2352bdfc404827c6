"""Task files: a good one loads, every mistake in a bad one is one line, built-ins stay."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from coordinator.daemon import plan_from_command
from coordinator.tasks import builtin_task, load_task
from coordinator.tflite_export import ReferenceModels
from fedge.cli import cli
from protocol.errors import ConfigError
from protocol.messages.commands import StartRounds
from protocol.tasks import BuiltinRecipe, TransferRecipe

DIGITS_TASK = """
name = "digits"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
[recipe]
kind = "builtin"
model = "digits_mlp"
[preprocess]
height = 8
width = 8
color = "gray"
[training]
epochs = 3
learning_rate = 0.1
min_samples = 5
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "task.toml"
    path.write_text(text)
    return path


def test_a_builtin_task_file_loads_with_its_labels_and_defaults(tmp_path: Path) -> None:
    task = load_task(_write(tmp_path, DIGITS_TASK)).spec
    assert task.labels == tuple(str(i) for i in range(10))
    assert task.recipe == BuiltinRecipe(model="digits_mlp")
    assert (task.training.epochs, task.training.min_samples) == (3, 5)


def test_the_builtin_tasks_are_the_digits_models_unchanged() -> None:
    task = builtin_task("digits_cnn").spec
    assert task.recipe == BuiltinRecipe(model="digits_cnn")
    assert (task.preprocess.height, task.preprocess.channels) == (8, 1)
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        builtin_task("nope")


def test_every_mistake_is_one_line(tmp_path: Path) -> None:
    text = """
name = "door camera"
labels = ["empty", "person", "empty"]
[recipe]
kind = "builtin"
model = "resnet"
[preprocess]
height = 0
width = 64
[training]
epochs = 0
colour = "red"
"""
    with pytest.raises(ConfigError) as caught:
        load_task(_write(tmp_path, text))
    lines = str(caught.value).splitlines()
    assert len(lines) == 6, lines
    assert all(line.startswith(f"{tmp_path / 'task.toml'}: ") for line in lines)
    joined = "\n".join(lines)
    for where in (
        "name:",
        "labels:",
        "recipe.builtin.model:",
        "preprocess.height:",
        "training.epochs:",
        "training.colour:",
    ):
        assert where in joined


def test_an_unknown_recipe_and_missing_labels_are_named(tmp_path: Path) -> None:
    text = 'name = "x"\n[recipe]\nkind = "magic"\n[preprocess]\nheight = 8\nwidth = 8\n'
    with pytest.raises(ConfigError) as caught:
        load_task(_write(tmp_path, text))
    message = str(caught.value)
    assert "labels: Field required" in message
    assert "recipe:" in message
    assert "magic" in message


def test_a_builtin_model_needs_its_class_count_and_input_shape(tmp_path: Path) -> None:
    text = DIGITS_TASK.replace('"8", "9"', '"8"').replace("height = 8", "height = 64")
    with pytest.raises(ConfigError) as caught:
        load_task(_write(tmp_path, text))
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert "10 classes, the task names 9 labels" in lines[0]
    assert "takes 8x8x1 inputs, the spec makes 64x8x1" in lines[1]


def test_not_toml_and_a_missing_file_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_task(_write(tmp_path, "name = [\n"))
    with pytest.raises(ConfigError, match="cannot read it"):
        load_task(tmp_path / "absent.toml")


def _transfer_task(backbone: str, side: int = 64, color: str = "rgb") -> str:
    return f"""
name = "door"
labels = ["empty", "person", "parcel"]
[recipe]
kind = "transfer"
backbone = "{backbone}"
hidden_units = [16]
[preprocess]
height = {side}
width = {side}
color = "{color}"
"""


def test_a_transfer_backbone_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_task(_write(tmp_path, _transfer_task("missing.tflite")))
    assert "recipe.backbone: cannot read" in str(caught.value)
    (tmp_path / "junk.tflite").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"recipe\.backbone: .*not a usable \.tflite"):
        load_task(_write(tmp_path, _transfer_task("junk.tflite")))


def test_a_backbone_the_preprocessing_cannot_feed_is_refused(
    tmp_path: Path, reference_models: ReferenceModels
) -> None:
    shutil.copy(reference_models.digits_float32, tmp_path / "backbone.tflite")
    with pytest.raises(ConfigError) as caught:
        load_task(_write(tmp_path, _transfer_task("backbone.tflite")))
    assert "backbone takes 8x8x1 images, the spec makes 64x64x3" in str(caught.value)
    task = load_task(_write(tmp_path, _transfer_task("backbone.tflite", 8, "gray")))
    assert isinstance(task.spec.recipe, TransferRecipe)
    assert task.backbone is not None
    assert task.backbone.feature_size == 10


def test_the_task_training_defaults_fill_what_the_command_leaves_out() -> None:
    command = StartRounds(command_id="c1", rounds=2, options={"epochs": 4})
    plan = plan_from_command(command, defaults={"epochs": 2, "min_samples": 9})
    assert (plan.config.epochs, plan.config.min_samples) == (4, 9)


def test_coordinator_run_refuses_a_bad_task_with_one_line_per_mistake(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name = "x"\nlabels = ["a"]\n')
    result = CliRunner().invoke(
        cli, ["coordinator", "run", "--task", str(path), "--data-dir", str(tmp_path / "d")]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "task.toml" in line]
    assert len(errors) == 3, result.output  # labels too short, recipe and preprocess missing
    assert "Traceback" not in result.output
