"""The built-in Keras architectures, in one place for both daemons.

The coordinator federates them (``coordinator.models`` adds their training recipe); an agent
that has TensorFlow trains them with Keras. Builders take the ``keras`` module, so nothing
here imports TensorFlow until a model is built, and return the bare, uncompiled model: who
builds it seeds and compiles it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from protocol.errors import ConfigError

if TYPE_CHECKING:
    import keras

__all__ = ["ARCHITECTURE_NAMES", "DIGITS_INPUT_SHAPE", "keras_architecture", "load_keras_file"]

DIGITS_INPUT_SHAPE: Final = (8, 8, 1)
_DIGITS_CLASSES = 10
_HIDDEN_UNITS = 32
_CONV_FILTERS = 16


def _digits_cnn(keras: Any) -> keras.Model:
    """The reference CNN of the federated workload: 8,714 parameters."""
    return keras.Sequential(
        [
            keras.Input(shape=DIGITS_INPUT_SHAPE),
            keras.layers.Conv2D(_CONV_FILTERS, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(_HIDDEN_UNITS, activation="relu"),
            keras.layers.Dense(_DIGITS_CLASSES, activation="softmax"),
        ],
        name="digits_cnn",
    )


def _digits_mlp(keras: Any) -> keras.Model:
    """A small dense model of the same digits."""
    return keras.Sequential(
        [
            keras.Input(shape=DIGITS_INPUT_SHAPE),
            keras.layers.Flatten(),
            keras.layers.Dense(_HIDDEN_UNITS, activation="relu"),
            keras.layers.Dense(_DIGITS_CLASSES, activation="softmax"),
        ],
        name="digits_mlp",
    )


_ARCHITECTURES: Mapping[str, Callable[[Any], keras.Model]] = MappingProxyType(
    {"digits_cnn": _digits_cnn, "digits_mlp": _digits_mlp}
)
ARCHITECTURE_NAMES: Final = tuple(_ARCHITECTURES)


def keras_architecture(name: str, keras: Any) -> keras.Model:
    """The named architecture, built with ``keras``; :class:`ConfigError` for unknown names."""
    builder = _ARCHITECTURES.get(name)
    if builder is None:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(ARCHITECTURE_NAMES)}",
            reason="unknown_model",
        )
    return builder(keras)


def load_keras_file(content: bytes, keras: Any) -> keras.Model:
    """A ``.keras`` file's model, in Keras's safe mode (no code from the file runs)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="fedge-keras-") as directory:
        path = Path(directory) / "model.keras"
        path.write_bytes(content)
        return keras.saving.load_model(path, compile=False, safe_mode=True)
