"""A coordinator's stored release must be of the task it is started with, or it refuses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from coordinator.state import CoordinatorState
from coordinator.task_producers import TransferProducer
from coordinator.task_resume import check_resumable
from coordinator.tasks import LoadedTask, load_task
from coordinator.tflite_export import ReferenceModels
from protocol.errors import ConfigError


def _task(folder: Path, labels: str = '"a", "b", "c"', hidden: str = "[]") -> LoadedTask:
    path = folder / "task.toml"
    path.write_text(
        f'name = "t"\nlabels = [{labels}]\n[recipe]\nkind = "transfer"\n'
        f'backbone = "features.tflite"\nhidden_units = {hidden}\n'
        '[preprocess]\nheight = 8\nwidth = 8\ncolor = "gray"\n'
    )
    return load_task(path)


def _store_release(state: CoordinatorState, task: LoadedTask) -> TransferProducer:
    assert task.backbone is not None
    producer = TransferProducer(task=task.spec, backbone=task.backbone)
    release, blobs = producer.release(
        version="r3", round_number=3, weights=producer.initial_weights(), metrics=None
    )
    for sha256, data in blobs.items():
        state.put_blob(sha256, data)
    state.put_release("r3", 3, release.model_dump_json())
    state.put("current_version", "r3")
    return producer


@pytest.fixture
def folder(tmp_path: Path, reference_models: ReferenceModels) -> Path:
    shutil.copy(reference_models.digits_float32, tmp_path / "features.tflite")
    return tmp_path


def _check(state: CoordinatorState, task: LoadedTask, folder: Path) -> None:
    assert task.backbone is not None
    producer = TransferProducer(task=task.spec, backbone=task.backbone)
    check_resumable(task, state, producer.initial_weights, folder / "data")


def test_the_same_task_and_an_empty_state_resume(folder: Path) -> None:
    state = CoordinatorState(folder / "state.sqlite")
    try:
        task = _task(folder)
        _check(state, task, folder)  # nothing stored yet
        _store_release(state, task)
        _check(state, _task(folder), folder)
    finally:
        state.close()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"labels": '"a", "b", "c", "d"'}, "labels ['a', 'b', 'c'] -> ['a', 'b', 'c', 'd']"),
        ({"hidden": "[16]"}, "model weights [(10, 3), (3,)] -> [(10, 16), (16,), (16, 3), (3,)]"),
    ],
    ids=["labels", "head"],
)
def test_a_changed_task_on_the_same_state_is_one_line(
    folder: Path, change: dict[str, str], named: str
) -> None:
    state = CoordinatorState(folder / "state.sqlite")
    try:
        _store_release(state, _task(folder))
        with pytest.raises(ConfigError) as caught:
            _check(state, _task(folder, **change), folder)
    finally:
        state.close()
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert named in message
    assert "new data_dir" in message
    assert caught.value.reason == "task_changed"


def test_another_backbone_on_the_same_state_is_named(
    folder: Path, reference_models: ReferenceModels
) -> None:
    state = CoordinatorState(folder / "state.sqlite")
    try:
        _store_release(state, _task(folder))
        shutil.copy(reference_models.digits_int8, folder / "features.tflite")
        with pytest.raises(ConfigError, match=r"backbone [0-9a-f]{12} -> [0-9a-f]{12}"):
            _check(state, _task(folder), folder)
    finally:
        state.close()
