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


EPOCHS = 3


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


def test_split_training_reaches_the_unsplit_accuracy_within_a_point() -> None:
    import keras
    import tensorflow as tf

    split = load_digits_split()
    model = build_reference_cnn()
    interpreter = load_interpreter_class("litert").interpreter_class(
        model_content=export_lower_tflite(model, CUT, batch_size=BATCH)
    )
    forward = interpreter.get_signature_runner("forward")
    backward = interpreter.get_signature_runner("backward")
    upper = UpperPart(model, CUT, learning_rate=LR)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    rng = np.random.default_rng(0)
    x_train = split.x_train.astype(np.float32)
    for _epoch in range(EPOCHS):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order) - BATCH + 1, BATCH):
            x, y = (
                x_train[order[start : start + BATCH]],
                split.y_train[order[start : start + BATCH]],
            )
            grad, weights, _loss = upper.step(forward(x=x)["activations"], y.astype(np.float32))
            upper.apply(weights)
            backward(x=x, grad=grad, lr=np.float32(LR))
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            for variable, g in zip(model.trainable_variables, grads, strict=True):
                variable.assign_sub(LR * g)
    x_test = split.x_test.astype(np.float32)
    usable = len(x_test) - len(x_test) % BATCH
    acts = np.concatenate(
        [forward(x=x_test[i : i + BATCH])["activations"] for i in range(0, usable, BATCH)]
    )
    split_accuracy = _accuracy(upper.predict(acts), split.y_test[:usable])
    unsplit_accuracy = _accuracy(np.asarray(model(x_test[:usable])), split.y_test[:usable])
    assert unsplit_accuracy > 0.5  # it learned something, so the comparison means something
    assert abs(split_accuracy - unsplit_accuracy) <= 0.01
