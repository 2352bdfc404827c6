"""The reference workload: scikit-learn's digits, its non-IID split and the reference CNN.

Everything here follows the reference workload exactly (data split, partition, model,
optimiser), so that benchmarks, tests and the demo all speak of the same numbers.

The data helpers need only NumPy and scikit-learn; TensorFlow/Keras is imported inside the
functions that build or train a model, so agents and tools without TensorFlow can still
import this module.

How a digit becomes a camera frame: :func:`digit_images_uint8` turns the (n, 8, 8, 1) float
inputs into 8-bit grayscale images, :func:`upscale_digit` enlarges one by pixel repetition
(the same as ``cv2.INTER_NEAREST`` at an integer factor) and :func:`digit_png` encodes it
losslessly. The agent's preprocessing for the digits model (:func:`digits_preprocess_spec`)
is: decode -> grayscale -> resize to 8x8 (``INTER_AREA``) -> scale by 1/255 -> float32
(n, 8, 8, 1). Area resampling of an integer-factor enlargement averages blocks of equal
pixels, so the agent recovers the 8-bit image exactly; the float input then differs from the
dataset's ``pixels / 16`` by at most half a grey level (1/510), from the 8-bit rounding.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from protocol.errors import PreprocessError
from protocol.preprocess import ColorOrder, InputDType, Normalization, PreprocessSpec, ResizeMode
from runtime.architectures import keras_architecture

if TYPE_CHECKING:
    import keras

__all__ = [
    "DIGITS_CLASSES",
    "DIGITS_LABELS",
    "DigitsSplit",
    "build_reference_cnn",
    "digit_images_uint8",
    "digit_png",
    "digits_preprocess_spec",
    "load_digits_split",
    "non_iid_partition",
    "train_reference_model",
    "upscale_digit",
    "write_agent_shares",
]

_log = logging.getLogger(__name__)

DIGITS_CLASSES = 10
DIGITS_LABELS: tuple[str, ...] = tuple(str(i) for i in range(DIGITS_CLASSES))
DIGIT_SIDE_PX = 8
# load_digits stores 4-bit intensities, 0..16 inclusive.
_DIGITS_MAX_INTENSITY = 16.0
TEST_FRACTION = 0.25
SPLIT_SEED = 0
PARTITION_SEED = 42
MODEL_SEED = 0
LEARNING_RATE = 0.05
BATCH_SIZE = 16
DEFAULT_FRAME_SIDE_PX = 64

# Hide TensorFlow's C++ INFO and WARNING lines (errors still print); only effective when set
# before TensorFlow is first imported.
_TF_CPP_MIN_LOG_LEVEL = "2"

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class DigitsSplit:
    """The reference train/test split: inputs (n, 8, 8, 1) float32 in [0, 1], labels int64."""

    x_train: FloatArray
    y_train: IntArray
    x_test: FloatArray
    y_test: IntArray


def _import_keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_MIN_LOG_LEVEL)
    import keras

    return keras


def load_digits_split() -> DigitsSplit:
    """scikit-learn's bundled digits, scaled to [0, 1] and split 75/25, stratified, seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float64) / _DIGITS_MAX_INTENSITY).astype(np.float32)
    x = x.reshape(-1, DIGIT_SIDE_PX, DIGIT_SIDE_PX, 1)
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return DigitsSplit(
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test),
    )


def non_iid_partition(
    y_train: npt.ArrayLike, num_agents: int, *, alpha: float = 0.5, seed: int = PARTITION_SEED
) -> list[IntArray]:
    """Split training indices over agents with a per-class Dirichlet(alpha) draw.

    For each class 0..9 in order: shuffle that class's indices, draw the agents' shares from
    Dirichlet(alpha), cut the shuffled indices at the cumulative shares and give piece i to
    agent i. Every index lands at exactly one agent; an agent may receive nothing.
    """
    if num_agents < 1:
        raise ValueError(f"num_agents must be at least 1, got {num_agents}")
    if alpha <= 0.0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    labels = np.asarray(y_train)
    rng = np.random.default_rng(seed)
    pieces: list[list[IntArray]] = [[] for _ in range(num_agents)]
    for cls in range(DIGITS_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(alpha * np.ones(num_agents))
        cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
        for agent, part in enumerate(np.split(idx, cuts)):
            pieces[agent].append(part.astype(np.int64))
    return [np.concatenate(parts) for parts in pieces]


def build_reference_cnn() -> keras.Model:
    """The reference CNN (8,714 parameters), seeded and compiled with SGD(0.05).

    Re-seeds Keras, NumPy and Python's ``random`` globally (``keras.utils.set_random_seed``),
    which is what makes the initial weights reproducible.
    """
    keras = _import_keras()

    keras.utils.set_random_seed(MODEL_SEED)
    model = keras_architecture("digits_cnn", keras)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def train_reference_model(
    epochs: int = 30, *, split: DigitsSplit | None = None, batch_size: int = BATCH_SIZE
) -> keras.Model:
    """Train the reference CNN centrally on the training split (seeded, so repeatable)."""
    if epochs < 0:
        raise ValueError(f"epochs must be non-negative, got {epochs}")
    data = split if split is not None else load_digits_split()
    model = build_reference_cnn()
    if epochs:
        model.fit(
            data.x_train,
            data.y_train,
            batch_size=batch_size,
            epochs=epochs,
            shuffle=True,
            verbose=0,
        )
    result: Any = model.evaluate(data.x_test, data.y_test, verbose=0, return_dict=True)
    _log.info("reference CNN trained for %d epochs: test accuracy %.4f", epochs, result["accuracy"])
    return model


def digit_images_uint8(x: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """(n, 8, 8[, 1]) floats in [0, 1] -> (n, 8, 8) 8-bit grayscale images (0..255)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"expected (n, h, w) or (n, h, w, 1) digits, got shape {arr.shape}")
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def upscale_digit(
    image: npt.ArrayLike, *, side_px: int = DEFAULT_FRAME_SIDE_PX
) -> npt.NDArray[np.uint8]:
    """Enlarge one 8x8 grayscale image by pixel repetition to ``side_px`` square.

    ``side_px`` must be a multiple of the image side, so area resampling back is exact.
    """
    img = np.asarray(image, dtype=np.uint8)
    if img.ndim != 2 or img.shape[0] != img.shape[1]:
        raise ValueError(f"expected one square grayscale image, got shape {img.shape}")
    factor, rest = divmod(side_px, img.shape[0])
    if factor < 1 or rest:
        raise ValueError(f"side_px {side_px} is not a multiple of {img.shape[0]}")
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def digit_png(image: npt.ArrayLike, *, side_px: int = DEFAULT_FRAME_SIDE_PX) -> bytes:
    """One 8x8 grayscale digit as a lossless PNG frame of ``side_px`` square."""
    import cv2

    big = upscale_digit(image, side_px=side_px)
    try:
        ok, buf = cv2.imencode(".png", big)
    except cv2.error as exc:
        raise PreprocessError(f"cannot encode digit as PNG: {exc}", reason="encode") from exc
    if not ok:
        raise PreprocessError("cannot encode digit as PNG", reason="encode")
    return bytes(buf.tobytes())


def digits_preprocess_spec(dtype: InputDType = InputDType.FLOAT32) -> PreprocessSpec:
    """How a frame becomes the digits model's input: gray, 8x8 stretch, x/255.

    ``dtype`` names the model's input tensor type; for INT8/UINT8 models the runtime
    quantises the scaled floats with the tensor's own scale and zero point.
    """
    return PreprocessSpec(
        height=DIGIT_SIDE_PX,
        width=DIGIT_SIDE_PX,
        color=ColorOrder.GRAY,
        resize=ResizeMode.STRETCH,
        normalization=Normalization.SCALE,
        scale=1.0 / 255.0,
        offset=0.0,
        dtype=dtype,
    )


def write_agent_shares(out_dir: Path, num_agents: int) -> list[Path]:
    """The reference non-IID split as folders ``agent-NN/<label>/<index>.png``, one per agent.

    This is how the reference workload reaches agents: as labelled images, imported into
    each agent's sample store (``fedge agent import``) exactly as a user's photos would be.
    """
    split = load_digits_split()
    images = digit_images_uint8(split.x_train)
    folders = []
    for agent, indexes in enumerate(non_iid_partition(split.y_train, num_agents)):
        folder = out_dir / f"agent-{agent:02d}"
        for index in indexes:
            label_dir = folder / str(int(split.y_train[index]))
            label_dir.mkdir(parents=True, exist_ok=True)
            (label_dir / f"{int(index):04d}.png").write_bytes(digit_png(images[index]))
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder)
    return folders
