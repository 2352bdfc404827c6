"""The ``split`` task recipe: a good task loads with its parts, each mistake is one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.split_model import LOWER_SIGNATURES
from coordinator.split_ushape import TOP_SIGNATURES
from coordinator.tasks import load_task
from protocol.errors import ConfigError
from protocol.tasks import SplitRecipe
from tests.coordinator.test_keras_task import _keras, _model, _save

DIGITS = """
name = "split-digits"
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
[preprocess]
height = 8
width = 8
color = "gray"
[training]
batch_size = 4
"""


def _task(tmp_path: Path, recipe: str, head: str = DIGITS) -> Path:
    path = tmp_path / "split.toml"
    path.write_text(f'{head}\n[recipe]\nkind = "split"\n{recipe}\n')
    return path


def _signatures(content: bytes) -> set[str]:
    from ai_edge_litert.interpreter import Interpreter

    return set(Interpreter(model_content=content).get_signature_list())


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_task(path)
    return str(caught.value).splitlines()


def test_a_builtin_split_task_loads_with_its_lower_part(tmp_path: Path) -> None:
    task = load_task(_task(tmp_path, 'model = "digits_cnn"\ncut = 3\nfederate = true'))
    assert isinstance(task.spec.recipe, SplitRecipe)
    assert task.spec.recipe.federate
    assert task.split is not None
    assert (task.split.cut, task.split.top, task.split.top_part) == (3, None, None)
    assert _signatures(task.split.lower) == set(LOWER_SIGNATURES)


def test_a_u_shaped_keras_task_cuts_by_layer_name(tmp_path: Path) -> None:
    model = _model()
    _save(model, tmp_path / "model.keras")
    head = 'name = "small"\nlabels = ["a", "b", "c"]\n[preprocess]\nheight = 8\nwidth = 8\n'
    cut = model.layers[1].name
    task = load_task(
        _task(tmp_path, f'model = "model.keras"\ncut = "{cut}"\nu_shaped = true', head)
    )
    assert task.split is not None
    assert (task.split.cut, task.split.top) == (1, len(model.layers) - 1)
    assert task.split.top_part is not None
    assert _signatures(task.split.top_part) == set(TOP_SIGNATURES)


@pytest.mark.parametrize(
    ("recipe", "line"),
    [
        ('model = "digits_cnn"\ncut = 9', "recipe.cut: 9 is out of range: the model has 5 layers"),
        ('model = "digits_cnn"\ncut = 0', "recipe.cut: 0 is out of range"),
        ('model = "digits_cnn"\ncut = "nope"', "recipe.cut: the model has no layer 'nope'"),
        ('model = "resnet"\ncut = 1', "recipe.model: 'resnet' is neither a .keras file nor"),
        ('model = "gone.keras"\ncut = 1', "recipe.model: cannot read"),
        (
            'model = "digits_cnn"\ncut = 3\nu_shaped = true\ntop = 2',
            "recipe.top: the top cut 2 must lie after the cut 3",
        ),
        ('model = "digits_cnn"\ncut = 3\ntop = 4', "recipe.top: only a u_shaped split"),
    ],
)
def test_each_mistake_is_one_line(tmp_path: Path, recipe: str, line: str) -> None:
    problems = _problems(_task(tmp_path, recipe))
    assert len(problems) == 1, problems
    assert line in problems[0]
    assert problems[0].startswith(str(tmp_path / "split.toml"))


def test_mistakes_together_are_one_line_each(tmp_path: Path) -> None:
    head = DIGITS.replace('"8", "9"]', '"8"]').replace("height = 8", "height = 9")
    problems = _problems(_task(tmp_path, 'model = "digits_mlp"\ncut = 99', head))
    assert len(problems) == 3, problems
    assert "labels: the model has 10 outputs, the task names 9 labels" in problems[0]
    assert "preprocess: the model takes 8x8x1 inputs, the spec makes 9x8x1" in problems[1]
    assert "recipe.cut: 99 is out of range" in problems[2]


def test_a_lower_part_litert_cannot_train_is_one_line(tmp_path: Path) -> None:
    keras: Any = _keras()
    _save(_model(batch_norm=True), tmp_path / "model.keras")
    head = 'name = "small"\nlabels = ["a", "b", "c"]\n[preprocess]\nheight = 8\nwidth = 8\n'
    assert keras is not None
    problems = _problems(_task(tmp_path, 'model = "model.keras"\ncut = 2', head))
    assert len(problems) == 1, problems
    assert "recipe.cut: the layers below 2 cannot run on LiteRT-only agents" in problems[0]
    assert "BatchNormalization" in problems[0]


def test_coordinator_run_refuses_a_checked_split_task_with_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fedge.cli import cli

    path = _task(tmp_path, 'model = "digits_cnn"\ncut = 3')
    result = CliRunner().invoke(
        cli, ["coordinator", "run", "--task", str(path), "--data-dir", str(tmp_path / "d")]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "split" in line]
    assert len(errors) == 1, result.output
    assert "a split task is checked but its rounds are not run" in errors[0]
