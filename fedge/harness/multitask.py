"""Task files and data shares for runs of several tasks on one fleet (tests, benchmarks)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from coordinator.tasks import builtin_task

__all__ = ["WORD_LABELS", "relabelled_shares", "write_task_file"]

# The digits under other names: a second task whose data lives on other devices.
WORD_LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _no_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_no_nulls(v) for v in value]
    return value


def write_task_file(
    path: Path, *, name: str, model: str, labels: Sequence[str] | None = None
) -> Path:
    """A task file of a built-in model under ``name``, with its own label names."""
    spec = builtin_task(model).spec.model_dump(mode="json")
    spec["name"] = name
    if labels is not None:
        spec["labels"] = list(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(_no_nulls(spec)))
    return path


def relabelled_shares(
    shares: Sequence[Path], out_dir: Path, names: Mapping[str, str]
) -> list[Path]:
    """Copies of ``shares`` (folders of ``<label>/<image>``) with labels renamed."""
    folders = []
    for share in shares:
        folder = out_dir / share.name
        for label_dir in sorted(p for p in share.iterdir() if p.is_dir()):
            shutil.copytree(label_dir, folder / names.get(label_dir.name, label_dir.name))
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder)
    return folders
