"""A Keras ``Sequential`` cut in two: a trainable builtin-only lower ``.tflite``, a Keras upper.

The lower part (layers ``[0, cut)``) becomes a ``tf.Module`` with the signatures a LiteRT-only
agent runs, built from the same builtin-only forward steps as :mod:`coordinator.trainable`:

- ``forward(x)`` -> ``{"activations": ...}`` on a fixed batch;
- ``backward(x, grad, lr)`` -> ``{"count": ...}``: one SGD step on the lower weights for the
  upstream gradient ``grad`` at the cut (the gradient of ``sum(activations * grad)``, which is
  the chain rule's lower half);
- ``get_weights()`` / ``set_weights(w0..)`` as in :mod:`coordinator.trainable`.

:class:`UpperPart` is layers ``[cut, end)`` in Keras: for a batch of activations and labels
it computes the gradient at the cut and the SGD step of its own weights without applying it,
so :mod:`coordinator.split` can stage the step and commit it only when the agent is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from coordinator.trainable import _Translator, attach_weight_signatures, import_tf
from coordinator.trainable_export import convert_module
from protocol.errors import ConfigError

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = ["LOWER_SIGNATURES", "UpperPart", "build_lower_module", "export_lower_tflite"]

LOWER_SIGNATURES: Final = ("forward", "backward", "get_weights", "set_weights")
FloatArray = npt.NDArray[np.float32]


def _check_cut(model: keras.Model, cut: int) -> None:
    if not 0 < cut < len(model.layers):
        raise ConfigError(
            f"cut must be between 1 and {len(model.layers) - 1} (the model has "
            f"{len(model.layers)} layers), got {cut}",
            reason="bad_cut",
        )


def lower_weight_count(model: keras.Model, cut: int) -> int:
    return sum(len(layer.weights) for layer in model.layers[:cut])


def cut_shape(model: keras.Model, cut: int) -> tuple[int, ...]:
    """The activation shape at the cut, without the batch."""
    _check_cut(model, cut)
    return tuple(int(d) for d in model.layers[cut - 1].output.shape[1:])


def build_lower_module(model: keras.Model, cut: int, *, batch_size: int) -> tf.Module:
    """Layers ``[0, cut)`` of ``model`` as a module with :data:`LOWER_SIGNATURES`."""
    _check_cut(model, cut)
    tf = import_tf()
    steps = _Translator(model).run()[:cut]
    initial = [np.asarray(w, dtype=np.float32) for w in model.get_weights()]
    initial = initial[: lower_weight_count(model, cut)]
    input_shape = [int(d) for d in model.input_shape[1:]]
    shape = list(cut_shape(model, cut))

    module = tf.Module(name=f"lower_{model.name}")
    variables = [tf.Variable(w, name=f"w{i}") for i, w in enumerate(initial)]
    module.model_weights = variables

    def activations(x: Any) -> Any:
        for step in steps:
            x = step(tf, variables, x)
        return x

    x_spec = tf.TensorSpec([batch_size, *input_shape], tf.float32, name="x")
    grad_spec = tf.TensorSpec([batch_size, *shape], tf.float32, name="grad")
    lr_spec = tf.TensorSpec([], tf.float32, name="lr")

    def forward(x: Any) -> dict[str, Any]:
        return {"activations": activations(x)}

    def backward(x: Any, grad: Any, lr: Any) -> dict[str, Any]:
        with tf.GradientTape() as tape:
            target = tf.reduce_sum(activations(x) * grad)
        for variable, g in zip(variables, tape.gradient(target, variables), strict=True):
            variable.assign_sub(lr * g)
        return {"count": tf.constant(len(variables), tf.int32)}

    module.forward = tf.function(forward, input_signature=[x_spec])
    module.backward = tf.function(backward, input_signature=[x_spec, grad_spec, lr_spec])
    attach_weight_signatures(tf, module, variables)
    return module


def export_lower_tflite(model: keras.Model, cut: int, *, batch_size: int) -> bytes:
    """The lower part as a trainable ``.tflite`` of builtin ops only."""
    module = build_lower_module(model, cut, batch_size=batch_size)
    return convert_module(module, LOWER_SIGNATURES, f"lower part of {model.name} at {cut}")


class UpperPart:
    """Layers ``[cut, end)`` of a model in Keras, stepped by plain SGD on demand.

    ``end`` defaults to the last layer; a U-shaped split ends earlier (the agent keeps the
    layers from ``end`` on) and steps through :meth:`forward` and :meth:`step_from`.
    """

    def __init__(
        self, model: keras.Model, cut: int, *, learning_rate: float, end: int | None = None
    ) -> None:
        _check_cut(model, cut)
        end = len(model.layers) if end is None else end
        if not cut < end <= len(model.layers):
            raise ConfigError(f"the top cut {end} must lie after the cut {cut}", reason="bad_cut")
        import keras

        self._tf = import_tf()
        layers = [keras.Input(cut_shape(model, cut))]
        layers += [type(layer).from_config(layer.get_config()) for layer in model.layers[cut:end]]
        self.model = keras.Sequential(layers, name=f"upper_{model.name}")
        weights = model.get_weights()
        self.model.set_weights(
            weights[lower_weight_count(model, cut) : lower_weight_count(model, end)]
        )
        self.learning_rate = learning_rate
        self._loss = keras.losses.SparseCategoricalCrossentropy()

    def weights(self) -> list[FloatArray]:
        return [np.asarray(w, dtype=np.float32) for w in self.model.get_weights()]

    def step(
        self, activations: FloatArray, labels: FloatArray
    ) -> tuple[FloatArray, list[FloatArray], float]:
        """(gradient at the cut, the weights after one SGD step, the loss); nothing applied."""
        tf = self._tf
        acts = tf.constant(activations)
        with tf.GradientTape() as tape:
            tape.watch(acts)
            loss = self._loss(tf.constant(labels.astype(np.int64)), self.model(acts, training=True))
        variables = self.model.trainable_variables
        grads = tape.gradient(loss, [acts, *variables])
        new = [
            np.asarray(v.numpy() - self.learning_rate * g.numpy(), dtype=np.float32)
            for v, g in zip(variables, grads[1:], strict=True)
        ]
        return np.asarray(grads[0].numpy(), dtype=np.float32), new, float(loss.numpy())

    def forward(self, activations: FloatArray) -> FloatArray:
        """This part's output for a batch (a U-shaped split sends it down to the agent's top)."""
        return np.asarray(self.model(activations, training=True), dtype=np.float32)

    def step_from(
        self, activations: FloatArray, grad_out: FloatArray
    ) -> tuple[FloatArray, list[FloatArray]]:
        """For the gradient at this part's output: (gradient at the cut, weights after SGD)."""
        tf = self._tf
        acts = tf.constant(activations)
        with tf.GradientTape() as tape:
            tape.watch(acts)
            target = tf.reduce_sum(self.model(acts, training=True) * tf.constant(grad_out))
        variables = self.model.trainable_variables
        grads = tape.gradient(target, [acts, *variables])
        new = [
            np.asarray(v.numpy() - self.learning_rate * g.numpy(), dtype=np.float32)
            for v, g in zip(variables, grads[1:], strict=True)
        ]
        return np.asarray(grads[0].numpy(), dtype=np.float32), new

    def apply(self, weights: list[FloatArray]) -> None:
        self.model.set_weights(weights)

    def predict(self, activations: FloatArray) -> FloatArray:
        return np.asarray(self.model(activations, training=False), dtype=np.float32)
