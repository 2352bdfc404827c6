"""Each layer the trainable exporter supports, against Keras on the same weights.

For every model: ``infer`` equals ``model.predict`` and one ``train`` step equals one Keras
SGD step (``train_on_batch``), weights and loss to 1e-5, on real images (scikit-learn's
digits, rendered in colour and resized).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from coordinator.trainable import TRAINABLE_SIGNATURES, build_trainable_module
from coordinator.trainable_export import convert_module
from coordinator.transfer_workload import colour_digits
from protocol.errors import ModelError
from tests.coordinator.test_trainable import Runners

BATCH = 8
LR = 0.05
ATOL = 1e-5
SIDE_PX = 16
CLASSES = 10


def _keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    import cv2

    pictures, labels = colour_digits()
    small = np.stack(
        [cv2.resize(p, (SIDE_PX, SIDE_PX), interpolation=cv2.INTER_AREA) for p in pictures[:64]]
    )
    return (small / 255.0).astype(np.float32), labels[:64].astype(np.int32)


def _compiled(model: Any) -> Any:
    keras = _keras()
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LR), loss="sparse_categorical_crossentropy"
    )
    return model


def _perturbed(model: Any, seed: int) -> None:
    """Weights away from their initial values (biases non-zero, variances positive)."""
    rng = np.random.default_rng(seed)
    weights = []
    for variable, value in zip(model.weights, model.get_weights(), strict=True):
        noise = rng.normal(0.0, 0.1, value.shape).astype(np.float32)
        if "variance" in variable.path:
            weights.append(np.abs(value + noise) + 0.5)
        else:
            weights.append(value + noise)
    model.set_weights(weights)


def _export(model: Any, batch: int = BATCH) -> Runners:
    module = build_trainable_module(model, batch_size=batch)
    return Runners(convert_module(module, TRAINABLE_SIGNATURES, model.name))


def _check_against_keras(model: Any, x: np.ndarray, y: np.ndarray) -> Runners:
    """infer and one train step equal Keras's; returns the runners after the step."""
    _perturbed(model, seed=5)
    runners = _export(model)
    runners.set_weights(model.get_weights())
    np.testing.assert_allclose(runners.infer(x), model.predict(x, verbose=0), atol=ATOL, rtol=0)
    before = model.get_weights()
    keras_loss = float(model.train_on_batch(x[:BATCH], y[:BATCH], return_dict=True)["loss"])
    loss = runners.train(x[:BATCH], y[:BATCH], np.ones(BATCH))
    after = runners.get_weights()
    for got, want, old, variable in zip(
        after, model.get_weights(), before, model.weights, strict=True
    ):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=variable.path)
        if not variable.trainable:
            assert np.array_equal(got, old), f"{variable.path} is frozen but changed"
    assert any(not np.allclose(a, b) for a, b in zip(after, before, strict=True))
    assert loss == pytest.approx(keras_loss, abs=ATOL)
    return runners


def _sequential(*layers: Any) -> Any:
    keras = _keras()
    keras.utils.set_random_seed(0)
    return _compiled(keras.Sequential([keras.Input((SIDE_PX, SIDE_PX, 3)), *layers]))


def _convs() -> Any:
    layers = _keras().layers
    return _sequential(
        layers.Conv2D(4, 3, padding="same", activation="relu"),
        layers.Conv2D(6, (2, 3), strides=2, activation="relu"),
        layers.Conv2D(5, 3, strides=2, padding="same"),
        layers.Flatten(),
        layers.Dense(CLASSES, activation="softmax"),
    )


def _depthwise() -> Any:
    layers = _keras().layers
    return _sequential(
        layers.Conv2D(4, 3, activation="relu"),
        layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2),
        # 7x7 at stride 2: the last row is read by no window (its gradient is zero).
        layers.DepthwiseConv2D((2, 3), strides=2, activation="relu", use_bias=False),
        layers.GlobalAveragePooling2D(),
        layers.Dense(CLASSES, activation="softmax"),
    )


def _overlapping_pools() -> Any:
    layers = _keras().layers
    return _sequential(
        layers.Conv2D(4, 3, activation="relu"),
        layers.AveragePooling2D(3, strides=2, padding="same"),
        layers.MaxPooling2D(3, strides=2),
        layers.Flatten(),
        layers.Dense(CLASSES, activation="softmax"),
    )


def _cropping_pools() -> Any:
    layers = _keras().layers
    return _sequential(
        layers.Conv2D(4, 3, activation="relu"),  # 14x14
        layers.MaxPooling2D(4),  # 'valid' drops the last two rows and columns
        layers.AveragePooling2D(2, padding="same"),  # 3x3: the last window is half padding
        layers.GlobalMaxPooling2D(),
        layers.Dense(CLASSES, activation="softmax"),
    )


def _frozen_batch_norm() -> Any:
    keras = _keras()
    keras.utils.set_random_seed(0)
    image = keras.Input((SIDE_PX, SIDE_PX, 3))
    x = keras.layers.Conv2D(6, 3, use_bias=False)(image)
    norm = keras.layers.BatchNormalization(epsilon=1e-3)
    norm.trainable = False
    x = keras.layers.ReLU()(norm(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(CLASSES)(x)
    return _compiled(keras.Model(image, keras.layers.Activation("softmax")(x), name="frozen_bn"))


def _activation_layers() -> Any:
    layers = _keras().layers
    return _sequential(
        layers.Flatten(),
        layers.Dense(16),
        layers.Activation("relu"),
        layers.Dropout(0.0),
        layers.Dense(CLASSES, activation="softmax"),
    )


@pytest.mark.parametrize(
    "build",
    [
        _convs,
        _depthwise,
        _overlapping_pools,
        _cropping_pools,
        _frozen_batch_norm,
        _activation_layers,
    ],
    ids=lambda b: b.__name__.strip("_"),
)
def test_layer_trains_as_keras_does(
    build: Callable[[], Any], images: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = images
    _check_against_keras(build(), x, y)


def test_dropout_is_identity_in_infer_and_inverted_dropout_in_train(
    images: tuple[np.ndarray, np.ndarray],
) -> None:
    import tensorflow as tf

    layers = _keras().layers
    rate = 0.5
    model = _sequential(
        layers.Flatten(),
        layers.Dense(12, activation="relu"),
        layers.Dropout(rate),
        layers.Dense(CLASSES, activation="softmax"),
    )
    _perturbed(model, seed=2)
    x, y = images
    runners = _export(model, batch=1)
    start = model.get_weights()
    runners.set_weights(start)
    np.testing.assert_allclose(runners.infer(x), model.predict(x, verbose=0), atol=ATOL, rtol=0)
    masks = []
    for example in range(5):
        runners.set_weights(start)
        sample, label = x[example : example + 1], y[example : example + 1]
        runners.train(sample, label, np.ones(1))
        after = runners.get_weights()
        # With one example, row i of the last kernel moves iff hidden unit i was kept (and
        # was not zero already): that reads the mask back out of the step.
        hidden = np.maximum(0.0, sample.reshape(1, -1) @ start[0] + start[1])[0]
        moved = np.any(after[2] != start[2], axis=1)
        alive = hidden > 0
        keep = np.where(alive, moved, 0.0).astype(np.float32)
        masks.append(tuple(keep[alive]))
        # The same step, written in TensorFlow with that mask.
        ws = [tf.Variable(w) for w in start]
        with tf.GradientTape() as tape:
            h = tf.maximum(0.0, tf.reshape(sample, [1, -1]) @ ws[0] + ws[1])
            logits = (h * keep / (1.0 - rate)) @ ws[2] + ws[3]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(label, logits))
        for w, g, got in zip(ws, tape.gradient(loss, ws), after, strict=True):
            np.testing.assert_allclose(got, (w - LR * g).numpy(), atol=ATOL, rtol=0)
    assert len(set(masks)) > 1, "every step drew the same dropout mask"


def test_a_trainable_batch_norm_is_refused_with_the_way_out() -> None:
    layers = _keras().layers
    model = _sequential(
        layers.Conv2D(4, 3),
        layers.BatchNormalization(),
        layers.Flatten(),
        layers.Dense(CLASSES, activation="softmax"),
    )
    with pytest.raises(ModelError, match=r"batch statistics; freeze it") as info:
        build_trainable_module(model, batch_size=BATCH)
    assert info.value.reason == "unsupported_model"


@pytest.mark.parametrize(
    ("layer", "why"),
    [
        (lambda: _keras().layers.Conv2D(4, 3, dilation_rate=2), "dilated"),
        (lambda: _keras().layers.LayerNormalization(axis=-1), "layer type is not supported"),
        (lambda: _keras().layers.Conv2D(4, 3, activation="tanh"), "activation 'tanh'"),
    ],
    ids=["dilation", "layer_norm", "tanh"],
)
def test_what_cannot_train_is_refused_by_name(layer: Callable[[], Any], why: str) -> None:
    model = _sequential(
        layer(), _keras().layers.Flatten(), _keras().layers.Dense(CLASSES, activation="softmax")
    )
    with pytest.raises(ModelError, match=why) as info:
        build_trainable_module(model, batch_size=BATCH)
    assert info.value.reason == "unsupported_model"


def test_a_branching_model_is_refused() -> None:
    keras = _keras()
    image = keras.Input((SIDE_PX, SIDE_PX, 3))
    a = keras.layers.Conv2D(4, 3)(image)
    b = keras.layers.Conv2D(4, 3)(image)
    merged = keras.layers.Flatten()(keras.layers.Add()([a, b]))
    model = keras.Model(image, keras.layers.Dense(CLASSES, activation="softmax")(merged))
    with pytest.raises(ModelError) as info:
        build_trainable_module(model, batch_size=BATCH)
    assert info.value.reason == "unsupported_model"


def example_cnn(keras: Any, side: int = 64) -> Any:
    """The yardstick: three Conv2D, two MaxPool, Flatten, Dense 64, Dense 10, at 64x64x3."""
    return keras.Sequential(
        [
            keras.Input((side, side, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),  # 29x29: 'valid' drops the last row and column
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ],
        name="example_cnn",
    )


def test_the_example_cnn_at_64x64_trains_as_keras_does() -> None:
    keras = _keras()
    keras.utils.set_random_seed(0)
    model = _compiled(example_cnn(keras))
    pictures, labels = colour_digits()
    x = (pictures[: BATCH * 2] / 255.0).astype(np.float32)
    _check_against_keras(model, x, labels[: BATCH * 2].astype(np.int32))
