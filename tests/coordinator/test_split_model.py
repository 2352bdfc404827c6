"""The split model's two halves take exactly the unsplit model's SGD step on a batch."""

import numpy as np
import pytest

from agent.runtime import load_interpreter_class
from coordinator.reference import build_reference_cnn, load_digits_split
from coordinator.split_model import UpperPart, cut_shape, export_lower_tflite
from protocol.errors import ConfigError

BATCH = 16
LR = 0.05
CUT = 3  # Conv2D, MaxPooling2D, Flatten on the device; the two Dense layers on the server


def test_lower_tflite_and_keras_upper_equal_the_unsplit_step() -> None:
    import keras
    import tensorflow as tf

    model = build_reference_cnn()
    assert cut_shape(model, CUT) == (256,)
    interpreter = load_interpreter_class("litert").interpreter_class(
        model_content=export_lower_tflite(model, CUT, batch_size=BATCH)
    )
    split = load_digits_split()
    x, y = split.x_train[:BATCH].astype(np.float32), split.y_train[:BATCH]
    acts = interpreter.get_signature_runner("forward")(x=x)["activations"]
    upper = UpperPart(model, CUT, learning_rate=LR)
    grad, upper_after, loss = upper.step(acts, y.astype(np.float32))
    interpreter.get_signature_runner("backward")(x=x, grad=grad, lr=np.float32(LR))
    lower_after = interpreter.get_signature_runner("get_weights")()

    with tf.GradientTape() as tape:
        full_loss = keras.losses.SparseCategoricalCrossentropy()(y, model(x, training=True))
    grads = tape.gradient(full_loss, model.trainable_variables)
    expected = [
        v.numpy() - LR * g.numpy() for v, g in zip(model.trainable_variables, grads, strict=True)
    ]
    assert loss == pytest.approx(float(full_loss), abs=1e-5)
    for index in range(2):
        np.testing.assert_allclose(lower_after[f"w{index}"], expected[index], atol=1e-5)
    for got, want in zip(upper_after, expected[2:], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_cut_outside_the_model_is_refused() -> None:
    with pytest.raises(ConfigError):
        cut_shape(build_reference_cnn(), 5)
