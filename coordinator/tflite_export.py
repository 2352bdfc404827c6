"""Keras -> TFLite conversion (float32 and full-integer int8) and the reference model files.

TensorFlow is imported inside the functions, so importing this module stays cheap.
Conversion failures of any kind become :class:`~protocol.errors.ModelError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from coordinator.reference import (
    DIGITS_LABELS,
    digits_preprocess_spec,
    load_digits_split,
    train_reference_model,
)
from protocol.errors import ModelError

if TYPE_CHECKING:
    import keras

__all__ = [
    "ReferenceModels",
    "build_two_output_model",
    "export_float_tflite",
    "export_int8_tflite",
    "write_reference_models",
]

_log = logging.getLogger(__name__)

# Hide TensorFlow's C++ INFO and WARNING lines; errors still print, and raise.
_TF_CPP_MIN_LOG_LEVEL = "2"
# Emitted for every full-integer conversion with integer inputs; the input scale comes
# from the representative dataset, which is exactly what we want.
_EXPECTED_CONVERTER_WARNING = "Statistics for quantized inputs were expected"
TWO_OUTPUT_INPUT_SHAPE = (12, 20, 3)
TWO_OUTPUT_CLASSES = 4
TWO_OUTPUT_REGRESSION_VALUES = 2
_TWO_OUTPUT_SEED = 1


def _import_tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_MIN_LOG_LEVEL)
    import tensorflow as tf

    return tf


def _convert(converter: Any, what: str) -> bytes:
    # Keras 3's export step prints the saved artifact's signature to stdout: keep it in the log.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EXPECTED_CONVERTER_WARNING)
            flatbuffer = converter.convert()
    # The converter raises ValueError, RuntimeError and its own (private) ConverterError.
    except Exception as exc:
        raise ModelError(f"TFLite conversion ({what}) failed: {exc}", reason="convert") from exc
    finally:
        if captured.getvalue():
            _log.debug("converter output (%s): %s", what, captured.getvalue().strip())
    if not isinstance(flatbuffer, bytes) or not flatbuffer:
        raise ModelError(f"TFLite conversion ({what}) produced no model", reason="convert")
    return flatbuffer


def export_float_tflite(model: keras.Model, *, sparse: bool = False) -> bytes:
    """The model as a float32 ``.tflite`` flatbuffer (builtin ops only).

    ``sparse``: kernels with many zeros (a pruned model) stored in TFLite's sparse format.
    """
    tf = _import_tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if sparse:
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return _convert(converter, "sparse float32" if sparse else "float32")


def export_int8_tflite(
    model: keras.Model,
    representative: npt.ArrayLike,
    *,
    io_type: Literal["int8", "uint8"] = "int8",
) -> bytes:
    """Full-integer post-training quantisation: int8 weights and activations.

    ``representative`` holds model inputs (n, ...) that calibrate the activation ranges; one
    sample is fed per calibration step. The input and output tensors are ``io_type``.
    """
    tf = _import_tf()
    samples = np.asarray(representative, dtype=np.float32)
    if samples.ndim < 2 or len(samples) == 0:
        raise ModelError(
            f"representative data must be a non-empty batch, got shape {samples.shape}",
            reason="convert",
        )

    def representative_dataset() -> Iterator[list[npt.NDArray[np.float32]]]:
        for i in range(len(samples)):
            yield [samples[i : i + 1]]

    io_dtype = {"int8": tf.int8, "uint8": tf.uint8}[io_type]
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = io_dtype
    converter.inference_output_type = io_dtype
    return _convert(converter, io_type)


def build_two_output_model() -> keras.Model:
    """A small seeded, untrained model with a non-square input and two heads.

    Input (1, 12, 20, 3) float32 with a fixed batch of one; outputs a 4-class softmax
    (``class_probs``) and a 2-value linear head (``regression``), in that order. It exists
    to exercise runtimes and postprocessing on something other than a square classifier.
    """
    _import_tf()  # before Keras loads TensorFlow, so its log level applies
    import keras

    keras.utils.set_random_seed(_TWO_OUTPUT_SEED)
    image = keras.Input(shape=TWO_OUTPUT_INPUT_SHAPE, batch_size=1, name="image")
    features = keras.layers.Conv2D(8, 3, activation="relu")(image)
    features = keras.layers.GlobalAveragePooling2D()(features)
    probs = keras.layers.Dense(TWO_OUTPUT_CLASSES, activation="softmax", name="class_probs")(
        features
    )
    values = keras.layers.Dense(TWO_OUTPUT_REGRESSION_VALUES, name="regression")(features)
    return keras.Model(image, [probs, values], name="two_output_nonsquare")


@dataclass(frozen=True, slots=True)
class ReferenceModels:
    """Paths of the files :func:`write_reference_models` writes into one directory."""

    directory: Path

    @property
    def digits_float32(self) -> Path:
        return self.directory / "digits_float32.tflite"

    @property
    def digits_int8(self) -> Path:
        """Full-integer quantised, int8 input and output."""
        return self.directory / "digits_int8.tflite"

    @property
    def digits_uint8(self) -> Path:
        """Full-integer quantised, uint8 input and output."""
        return self.directory / "digits_uint8.tflite"

    @property
    def digits_weights(self) -> Path:
        """The trained weights the ``.tflite`` files were converted from.

        An ``.npz`` (load with ``allow_pickle=False``) holding ``w0``..``w5`` in the order of
        ``build_reference_cnn().get_weights()``.
        """
        return self.directory / "digits_weights.npz"

    @property
    def labels(self) -> Path:
        return self.directory / "labels.txt"

    @property
    def preprocess(self) -> Path:
        """The float32 digits :class:`~protocol.preprocess.PreprocessSpec` as JSON."""
        return self.directory / "preprocess.json"

    @property
    def two_output(self) -> Path:
        """See :func:`build_two_output_model`."""
        return self.directory / "two_output_nonsquare.tflite"

    def load_digits_weights(self) -> list[npt.NDArray[np.float32]]:
        """The arrays of :attr:`digits_weights`, ready for ``model.set_weights``."""
        with np.load(self.digits_weights, allow_pickle=False) as archive:
            return [archive[f"w{i}"] for i in range(len(archive.files))]

    def all_paths(self) -> tuple[Path, ...]:
        return (
            self.digits_float32,
            self.digits_int8,
            self.digits_uint8,
            self.digits_weights,
            self.labels,
            self.preprocess,
            self.two_output,
        )


def write_reference_models(out_dir: Path, *, epochs: int = 30) -> ReferenceModels:
    """Train the reference CNN and write every reference model file into ``out_dir``.

    Writes the digits CNN as float32, int8 and uint8 ``.tflite`` plus its weights,
    ``labels.txt`` ("0".."9", one per line), ``preprocess.json`` and the two-output model.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = ReferenceModels(out_dir)
    split = load_digits_split()
    model = train_reference_model(epochs, split=split)

    writers: list[tuple[Path, Callable[[], bytes]]] = [
        (paths.digits_float32, lambda: export_float_tflite(model)),
        (paths.digits_int8, lambda: export_int8_tflite(model, split.x_train)),
        (paths.digits_uint8, lambda: export_int8_tflite(model, split.x_train, io_type="uint8")),
        (paths.two_output, lambda: export_float_tflite(build_two_output_model())),
    ]
    for path, produce in writers:
        path.write_bytes(produce())
        _log.info("wrote %s (%d bytes)", path, path.stat().st_size)
    weights = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    with paths.digits_weights.open("wb") as fh:
        np.savez(fh, allow_pickle=False, **weights)
    paths.labels.write_text("\n".join(DIGITS_LABELS) + "\n", encoding="utf-8")
    paths.preprocess.write_text(digits_preprocess_spec().model_dump_json(indent=2) + "\n", "utf-8")
    return paths
