"""A U-shaped split's three parts take exactly the unsplit model's SGD step on a batch."""

import numpy as np
import pytest

from agent.runtime import load_interpreter_class
from coordinator.reference import build_reference_cnn, load_digits_split
from coordinator.split_model import UpperPart, export_lower_tflite
from coordinator.split_ushape import export_top_tflite
from protocol.errors import ConfigError

BATCH = 16
LR = 0.05
CUT, TOP = 3, 4  # conv, pool, flatten | Dense(32) | Dense(10): only the middle on the server


def test_lower_middle_and_top_equal_the_unsplit_step() -> None:
    import keras
    import tensorflow as tf

    model = build_reference_cnn()
    runtime = load_interpreter_class("litert").interpreter_class
    lower = runtime(model_content=export_lower_tflite(model, CUT, batch_size=BATCH))
    top = runtime(model_content=export_top_tflite(model, TOP, batch_size=BATCH))
    split = load_digits_split()
    x, y = split.x_train[:BATCH].astype(np.float32), split.y_train[:BATCH]
    middle = UpperPart(model, CUT, learning_rate=LR, end=TOP)
    acts = lower.get_signature_runner("forward")(x=x)["activations"]
    out = middle.forward(acts)
    trained = top.get_signature_runner("train")(a=out, y=y.astype(np.int32), lr=np.float32(LR))
    grad_in, middle_after = middle.step_from(acts, trained["grad"])
    lower.get_signature_runner("backward")(x=x, grad=grad_in, lr=np.float32(LR))

    with tf.GradientTape() as tape:
        full_loss = keras.losses.SparseCategoricalCrossentropy()(y, model(x, training=True))
    grads = tape.gradient(full_loss, model.trainable_variables)
    expected = [
        v.numpy() - LR * g.numpy() for v, g in zip(model.trainable_variables, grads, strict=True)
    ]
    assert float(trained["loss"]) == pytest.approx(float(full_loss), abs=1e-5)
    lower_after = lower.get_signature_runner("get_weights")()
    top_after = top.get_signature_runner("get_weights")()
    got = [lower_after["w0"], lower_after["w1"], *middle_after, top_after["w0"], top_after["w1"]]
    for have, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(have, want, atol=1e-5)


def test_a_top_cut_before_the_cut_is_refused() -> None:
    with pytest.raises(ConfigError):
        UpperPart(build_reference_cnn(), CUT, learning_rate=LR, end=CUT)
