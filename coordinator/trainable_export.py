"""A model definition's trainable module, converted to a ``.tflite`` of builtin ops only.

:mod:`coordinator.trainable` builds the ``tf.Module``; this converts it, so LiteRT-only
agents can run its ``train`` signature.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from coordinator.trainable import DEFAULT_BATCH_SIZE, TRAINABLE_SIGNATURES, import_tf
from protocol.errors import ModelError

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["TrainableDefinition", "convert_module", "export_trainable_tflite"]

_log = logging.getLogger(__name__)

_NON_BUILTIN_OPS = re.compile(r"TF Select ops: ([^\n]+)")


def _convert(converter: Any, what: str) -> bytes:
    # The converter prints progress to stdout: keep it in the log instead.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            flatbuffer = converter.convert()
    # The converter raises ValueError, RuntimeError and its own (private) ConverterError.
    except Exception as exc:
        # The converter's message is a long MLIR dump; the ops it lacks are the news.
        missing = _NON_BUILTIN_OPS.search(str(exc))
        if missing is None:
            raise ModelError(f"TFLite conversion ({what}) failed: {exc}", reason="convert") from exc
        _log.debug("conversion of %s failed: %s", what, exc)
        raise ModelError(
            f"TFLite conversion ({what}) failed: it needs ops that are not TFLite builtins "
            f"({missing.group(1).strip()})",
            reason="convert",
        ) from exc
    finally:
        if captured.getvalue():
            _log.debug("converter output (%s): %s", what, captured.getvalue().strip())
    if not isinstance(flatbuffer, bytes) or not flatbuffer:
        raise ModelError(f"TFLite conversion ({what}) produced no model", reason="convert")
    return flatbuffer


class TrainableDefinition(Protocol):
    """What the exporter needs of a model definition (``coordinator.models`` has them).

    A protocol, so this module (which the definitions use) does not import them back.
    """

    @property
    def name(self) -> str: ...

    def build_trainable(self, batch_size: int) -> tf.Module: ...


def export_trainable_tflite(
    definition: TrainableDefinition, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> bytes:
    """The definition's trainable module as a ``.tflite`` of builtin ops only.

    Its initial weights are the definition's Keras model's; ``train`` takes batches
    of exactly ``batch_size``. Any failure (an op outside the builtins included) raises
    :class:`ModelError`.
    """
    module = definition.build_trainable(batch_size)
    flatbuffer = convert_module(module, TRAINABLE_SIGNATURES, f"trainable {definition.name}")
    _log.info(
        "exported trainable %s (batch %d): %d bytes", definition.name, batch_size, len(flatbuffer)
    )
    return flatbuffer


def convert_module(module: tf.Module, signature_names: Sequence[str], what: str) -> bytes:
    """A ``tf.Module``'s signatures as a ``.tflite`` of builtin ops with resource variables."""
    tf = import_tf()
    saved_dir = Path(tempfile.mkdtemp(prefix="fedge-trainable-"))
    try:
        try:
            signatures = {
                name: getattr(module, name).get_concrete_function() for name in signature_names
            }
            tf.saved_model.save(module, str(saved_dir), signatures=signatures)
            converter = tf.lite.TFLiteConverter.from_saved_model(
                str(saved_dir), signature_keys=list(signature_names)
            )
        # Tracing and saving raise TensorFlow's own errors, ValueError and TypeError.
        except Exception as exc:
            raise ModelError(f"cannot save {what} for conversion: {exc}", reason="convert") from exc
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        return _convert(converter, what)
    finally:
        shutil.rmtree(saved_dir, ignore_errors=True)
