"""``fedge model soup``: serving models of one task trained apart, averaged into one.

Real data and fedge's own code: the transfer workload (scikit-learn's digits as 64x64 colour
photos, a backbone pretrained with Keras on the other digits), two heads trained by
:class:`agent.head.HeadTrainer` from one starting point on the two agents' shares (two
fleets' data), composed into serving models as a transfer release composes them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from agent.head import HeadTrainer
from agent.runtime import TfliteModel
from agent.training import TrainConfig
from agent.transfer_task import Backbone
from coordinator.task_producers import head_initial_weights
from coordinator.transfer_workload import TASK_LABELS, TransferWorkload, write_transfer_workload
from fedge.cli import cli
from fedge.harness.transfer_task import folder_images
from protocol.preprocess import PreprocessSpec
from runtime.composition import Head, compose
from runtime.merging import read_composed

SPEC = PreprocessSpec(height=64, width=64)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> TransferWorkload:
    return write_transfer_workload(tmp_path_factory.mktemp("soup"), 2)


def _head(features: np.ndarray, y: np.ndarray) -> Head:
    # One starting point for every ingredient, as a soup needs.
    trainer = HeadTrainer(head_initial_weights(features.shape[1], (), len(TASK_LABELS), seed=0))
    for epoch in range(10):
        trainer.train(features, y, TrainConfig(batch_size=16, learning_rate=0.1, seed=epoch))
    return Head("digits", tuple(trainer.get_weights()), TASK_LABELS)


@pytest.fixture(scope="module")
def ingredients(workload: TransferWorkload) -> dict[str, Path]:
    """Serving models of the heads trained on each share, and one trained on wrong labels."""
    content = workload.backbone.read_bytes()
    backbone = Backbone(content)
    paths = {}
    for share in workload.shares:
        x, y = folder_images(share, TASK_LABELS, SPEC)
        path = workload.directory / f"{share.name}.tflite"
        path.write_bytes(compose(content, [_head(backbone.embed(x), y)]))
        paths[share.name] = path
    x, y = folder_images(workload.shares[0], TASK_LABELS, SPEC)
    shuffled = (y + 1) % len(TASK_LABELS)  # every label wrong: a deliberately bad ingredient
    paths["bad"] = workload.directory / "bad.tflite"
    paths["bad"].write_bytes(compose(content, [_head(backbone.embed(x), shuffled)]))
    return paths


def _soup(*args: Any) -> Any:
    return CliRunner().invoke(cli, ["model", "soup", *map(str, args)])


def _accuracy(model_path: Path, test: Path) -> float:
    x, y = folder_images(test, TASK_LABELS, SPEC)
    model = TfliteModel.from_bytes(model_path.read_bytes())
    predicted = [int(np.argmax(model.predict(sample[None])[0])) for sample in x]
    return float(np.mean(np.asarray(predicted) == y))


def test_two_fleets_heads_soup_into_one_as_accurate_as_the_best(
    workload: TransferWorkload, ingredients: dict[str, Path]
) -> None:
    a, b = ingredients["agent-00"], ingredients["agent-01"]
    out = workload.directory / "soup.tflite"
    result = _soup(a, b, "--eval", workload.test, "--out", out, "--max-drop", "1")
    assert result.exit_code == 0, result.output
    print(result.output)
    assert "a uniform soup of 2 models" in result.output
    soup, first, second = (
        float(v) / 100
        for v in re.search(r"soup ([\d.]+)% .* ([\d.]+)%, .* ([\d.]+)%;", result.output).groups()  # type: ignore[union-attr]
    )
    # The written model, run by LiteRT, scores what the command measured on its heads.
    assert _accuracy(out, workload.test) == pytest.approx(soup, abs=1e-3)
    assert _accuracy(a, workload.test) == pytest.approx(first, abs=1e-3)
    assert soup >= max(first, second) - 0.01
    assert soup > 0.8


def test_greedy_soup_leaves_the_bad_ingredient_out(
    workload: TransferWorkload, ingredients: dict[str, Path]
) -> None:
    out = workload.directory / "greedy.tflite"
    good, bad = ingredients["agent-00"], ingredients["bad"]
    # The task file's [preprocess] prepares the images (the same as the default here).
    result = _soup(
        good, bad, "--greedy", "--eval", workload.test, "--out", out, "--task", workload.task
    )
    assert result.exit_code == 0, result.output
    assert "1 in the soup" in result.output
    assert _accuracy(out, workload.test) == pytest.approx(_accuracy(good, workload.test))


def test_the_guard_refuses_a_soup_that_loses_accuracy(
    workload: TransferWorkload, ingredients: dict[str, Path]
) -> None:
    out = workload.directory / "refused.tflite"
    good, bad = ingredients["agent-00"], ingredients["bad"]
    result = _soup(good, bad, "--eval", workload.test, "--out", out, "--max-drop", "2")
    print(result.output)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: the soup is refused: task digits's accuracy falls")
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_other_backbones_and_other_labels_get_one_clear_line(
    workload: TransferWorkload, ingredients: dict[str, Path]
) -> None:
    good = ingredients["agent-00"]
    part = read_composed(good.read_bytes())
    (head,) = part.heads
    relabelled = workload.directory / "relabelled.tflite"
    relabelled.write_bytes(
        compose(
            part.backbone,
            [Head("digits", head.weights, tuple(reversed(TASK_LABELS)))],
            backbone_sha256=part.backbone_sha256,
        )
    )
    other = workload.directory / "other-backbone.tflite"
    other.write_bytes(compose(workload.backbone_int8.read_bytes(), [head]))
    for second, start in (
        (relabelled, "is not the same task as"),
        (other, "has another backbone than"),
    ):
        result = _soup(good, second, "--eval", workload.test, "--out", workload.directory / "x")
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {second} {start}")
        assert len(result.output.strip().splitlines()) == 1
