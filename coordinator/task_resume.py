"""Whether a coordinator's stored releases belong to the task it is started with.

A restarted coordinator carries on from its newest release. Started on the same data
directory with an edited task (other labels, another backbone, another head, other
preprocessing), it would go on publishing the old task's release, or a head whose classes
no longer match the labels, and every agent would refuse it round after round. So the
coordinator checks first and refuses to start with one line saying what changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from coordinator.state import CoordinatorState
from coordinator.tasks import LoadedTask
from protocol.errors import ConfigError, FedgeError
from protocol.messages.rounds import ModelRelease
from protocol.updates import decode_weights

__all__ = ["check_resumable"]


def check_resumable(
    task: LoadedTask,
    state: CoordinatorState,
    initial: Callable[[], Sequence[np.ndarray]],
    data_dir: Path,
) -> None:
    """Raise :class:`ConfigError` (one line) when ``state``'s release is of another task.

    ``initial`` gives the weights the task's model would start from: the stored head must
    have their shapes. A state with no release yet always fits.
    """
    version = state.get("current_version")
    text = state.release_json(version) if version is not None else None
    if text is None:
        return
    release = ModelRelease.model_validate_json(text)
    spec = task.spec
    changed = []
    if release.labels != spec.labels:
        changed.append(f"labels {list(release.labels)} -> {list(spec.labels)}")
    if release.recipe != spec.recipe.kind:
        changed.append(f"recipe {release.recipe} -> {spec.recipe.kind}")
    if task.backbone is not None:
        sha = hashlib.sha256(task.backbone.content).hexdigest()
        if release.trainable.sha256 != sha:
            changed.append(f"backbone {release.trainable.sha256[:12]} -> {sha[:12]}")
        if release.preprocess != spec.preprocess:
            changed.append("preprocess")
    try:
        stored = [w.shape for w in decode_weights(state.blob(release.weights.sha256))]
    except FedgeError:
        stored = None  # a damaged state: the round logic reports it where it reads it
    wanted = [np.shape(w) for w in initial()] if stored is not None else None
    if stored != wanted:
        changed.append(f"model weights {stored} -> {wanted}")
    if changed:
        raise ConfigError(
            f"{data_dir}: its releases (up to {release.version}) are of another task "
            f"({'; '.join(changed)}); start a changed task with a new data_dir",
            reason="task_changed",
        )
