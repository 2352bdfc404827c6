"""The transfer workload: colour digits at 64x64, a backbone that never saw the task's classes.

Used by the system tests and ``bench/transfer.py``, so both speak of the same numbers.

- Images: scikit-learn's digits, each rendered as a 64x64 RGB photo-like frame: the 8x8
  intensities enlarged (bilinear), ink and paper in a random colour each, plus mild noise
  (``numpy.random.default_rng(IMAGE_SEED)``).
- Backbone: a small CNN (three Conv2D, two MaxPool, global average pooling: 64 features)
  pretrained with Keras on the digits 0-4 only, then exported without its classifier as a
  float32 and an int8 feature-extractor ``.tflite``. The task is the digits 5-9, which the
  backbone never saw.
- Task data: the digits 5-9, ``train_test_split(test_size=0.25, random_state=0, stratify)``,
  the training part split non-IID over the agents (the reference Dirichlet(0.5) partition).

Everything is written as files a user would have: ``backbone.tflite``, ``task.toml``,
``shares/agent-NN/<label>/<index>.png`` and a central ``test/<label>/<index>.png`` folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.reference import non_iid_partition

__all__ = [
    "BACKBONE_CLASSES",
    "TASK_CLASSES",
    "TASK_LABELS",
    "TransferWorkload",
    "colour_digits",
    "write_task_images",
    "write_transfer_workload",
]

SIDE_PX = 64
IMAGE_SEED = 7
BACKBONE_SEED = 0
BACKBONE_CLASSES = (0, 1, 2, 3, 4)
TASK_CLASSES = (5, 6, 7, 8, 9)
TASK_LABELS = ("five", "six", "seven", "eight", "nine")
FEATURES = 64
_NOISE = 6.0


@dataclass(frozen=True, slots=True)
class TransferWorkload:
    directory: Path
    backbone: Path
    backbone_int8: Path
    task: Path
    shares: tuple[Path, ...]
    test: Path


def colour_digits() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Every digit as a (64, 64, 3) RGB uint8 image, with its class."""
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(IMAGE_SEED)
    images = np.empty((len(digits.images), SIDE_PX, SIDE_PX, 3), np.uint8)
    for i, small in enumerate(digits.images):
        ink = cv2.resize(
            (small / 16.0).astype(np.float32), (SIDE_PX, SIDE_PX), interpolation=cv2.INTER_LINEAR
        )[..., None]
        paper = rng.uniform(0, 110, 3)
        colour = rng.uniform(140, 255, 3)
        noise = rng.normal(0.0, _NOISE, (SIDE_PX, SIDE_PX, 3))
        images[i] = np.clip(paper + (colour - paper) * ink + noise, 0, 255).astype(np.uint8)
    return images, np.asarray(digits.target, np.int64)


def _import_keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def pretrain_backbone(images: npt.NDArray[np.uint8], labels: npt.ArrayLike, *, epochs: int) -> Any:
    """The feature extractor (images scaled to 0..1 -> 64 features), trained on its classes."""
    keras = _import_keras()
    keras.utils.set_random_seed(BACKBONE_SEED)
    inputs = keras.Input((SIDE_PX, SIDE_PX, 3))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(FEATURES, 3, padding="same", activation="relu")(h)
    # Batch-normalised features: well scaled for plain SGD on the head, as a feature
    # vector from a published extractor usually is.
    features = keras.layers.BatchNormalization()(keras.layers.GlobalAveragePooling2D()(h))
    classes = len(set(np.asarray(labels).tolist()))
    outputs = keras.layers.Dense(classes, activation="softmax")(features)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(images.astype(np.float32) / 255.0, labels, epochs=epochs, batch_size=32, verbose=0)
    return keras.Model(inputs, features)


def _write_png(path: Path, rgb: npt.NDArray[np.uint8]) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    path.write_bytes(encoded.tobytes())


def task_toml(backbone: str, *, rounds_epochs: int = 10, learning_rate: float = 0.1) -> str:
    labels = ", ".join(f'"{label}"' for label in TASK_LABELS)
    return f"""name = "colour-digits"
labels = [{labels}]

[recipe]
kind = "transfer"
backbone = "{backbone}"

[preprocess]
height = {SIDE_PX}
width = {SIDE_PX}

[training]
epochs = {rounds_epochs}
batch_size = 16
learning_rate = {learning_rate}
min_samples = 4
"""


def write_task_images(out_dir: Path, num_agents: int) -> tuple[tuple[Path, ...], Path]:
    """The task's frames (digits 5-9): agents' non-IID shares and the central test folder.

    ``shares/agent-NN/<label>/<index>.png`` and ``test/<label>/<index>.png`` under
    ``out_dir``; for any backbone that takes 64x64 colour frames.
    """
    from sklearn.model_selection import train_test_split

    images, labels = colour_digits()
    task = np.flatnonzero(np.isin(labels, TASK_CLASSES))
    names = dict(zip(TASK_CLASSES, TASK_LABELS, strict=True))
    train, test = train_test_split(task, test_size=0.25, random_state=0, stratify=labels[task])
    for index in test:
        _write_png(out_dir / "test" / names[int(labels[index])] / f"{index:04d}.png", images[index])
    shares = []
    for agent, part in enumerate(non_iid_partition(labels[train] - TASK_CLASSES[0], num_agents)):
        folder = out_dir / "shares" / f"agent-{agent:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in train[part]:
            label = names[int(labels[index])]
            _write_png(folder / label / f"{index:04d}.png", images[index])
        shares.append(folder)
    return tuple(shares), out_dir / "test"


def write_transfer_workload(
    out_dir: Path, num_agents: int, *, epochs: int = 15
) -> TransferWorkload:
    """Backbones, task file, agents' shares and the central test folder under ``out_dir``."""
    from coordinator.tflite_export import export_float_tflite, export_int8_tflite

    images, labels = colour_digits()
    seen = np.isin(labels, BACKBONE_CLASSES)
    backbone = pretrain_backbone(images[seen], labels[seen], epochs=epochs)
    out_dir.mkdir(parents=True, exist_ok=True)
    float_path, int8_path = out_dir / "backbone.tflite", out_dir / "backbone_int8.tflite"
    float_path.write_bytes(export_float_tflite(backbone))
    calibration = images[seen][:200].astype(np.float32) / 255.0
    int8_path.write_bytes(export_int8_tflite(backbone, calibration))
    task_path = out_dir / "task.toml"
    task_path.write_text(task_toml(float_path.name))
    shares, test = write_task_images(out_dir, num_agents)
    return TransferWorkload(out_dir, float_path, int8_path, task_path, shares, test)
