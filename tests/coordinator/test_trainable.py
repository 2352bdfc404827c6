"""Trainable .tflite models: builtin ops only, and the same maths as the Keras models."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

from agent.runtime import load_interpreter_class
from agent.training import LiteRTTrainer, TrainConfig
from coordinator.models import MODEL_NAMES, ModelDefinition, get_model_definition
from coordinator.reference import DigitsSplit, load_digits_split
from coordinator.trainable import TRAINABLE_SIGNATURES
from coordinator.trainable_export import export_trainable_tflite
from protocol.errors import ConfigError, ModelError

BATCH = 16
LR = 0.05
ATOL = 1e-5


@functools.cache
def exported_trainable(name: str, batch_size: int = BATCH) -> bytes:
    """The trainable export of a registered model, converted once per test session."""
    return export_trainable_tflite(get_model_definition(name), batch_size=batch_size)


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


@pytest.fixture(params=MODEL_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Runners:
    """The four signature runners of one trainable model in one interpreter."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.interpreter = load_interpreter_class().interpreter_class(model_content=content)
        self.signatures = self.interpreter.get_signature_list()
        self.run = {s: self.interpreter.get_signature_runner(s) for s in TRAINABLE_SIGNATURES}

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.run["infer"](x=np.asarray(x, np.float32))["output"])

    def get_weights(self) -> list[np.ndarray]:
        out = self.run["get_weights"]()
        return [np.array(out[f"w{i}"]) for i in range(len(out))]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.run["set_weights"](
            **{f"w{i}": np.asarray(w, np.float32) for i, w in enumerate(weights)}
        )

    def train(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
        out = self.run["train"](
            x=np.asarray(x, np.float32),
            y=np.asarray(y, np.int32),
            mask=np.asarray(mask, np.float32),
            lr=np.array(LR, np.float32),
        )
        return float(out["loss"])


def _random_weights(weights: list[np.ndarray], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, 0.3, w.shape).astype(np.float32) for w in weights]


def _assert_weights_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)


def test_registry_names_and_unknown_model() -> None:
    assert MODEL_NAMES == ("digits_cnn", "digits_mlp")
    definition = get_model_definition("digits_mlp")
    assert (definition.input_shape, definition.num_classes) == ((8, 8, 1), 10)
    with pytest.raises(ConfigError, match="digits_cnn, digits_mlp") as info:
        get_model_definition("resnet")
    assert info.value.reason == "unknown_model"


def test_digits_cnn_is_the_reference_cnn() -> None:
    model = get_model_definition("digits_cnn").build_keras()
    assert model.count_params() == 8_714
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D",
        "MaxPooling2D",
        "Flatten",
        "Dense",
        "Dense",
    ]
    again = get_model_definition("digits_cnn").build_keras()
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        assert np.array_equal(a, b)


def test_export_has_the_four_signatures_with_a_fixed_train_batch(name: str) -> None:
    runners = Runners(exported_trainable(name))
    assert set(runners.signatures) == set(TRAINABLE_SIGNATURES)
    assert runners.signatures["infer"] == {"inputs": ["x"], "outputs": ["output"]}
    assert sorted(runners.signatures["train"]["inputs"]) == ["lr", "mask", "x", "y"]
    assert runners.signatures["train"]["outputs"] == ["loss"]
    count = len(get_model_definition(name).build_keras().get_weights())
    assert runners.signatures["set_weights"]["inputs"] == [f"w{i}" for i in range(count)]
    assert runners.signatures["get_weights"]["outputs"] == [f"w{i}" for i in range(count)]
    train_x = runners.run["train"].get_input_details()["x"]
    assert list(train_x["shape"]) == [BATCH, 8, 8, 1]
    assert list(train_x["shape_signature"]) == [BATCH, 8, 8, 1]
    infer_x = runners.run["infer"].get_input_details()["x"]
    assert infer_x["shape_signature"][0] == -1


def test_get_weights_equals_keras_initial_weights(name: str) -> None:
    keras_weights = get_model_definition(name).build_keras().get_weights()
    got = Runners(exported_trainable(name)).get_weights()
    assert [w.shape for w in got] == [w.shape for w in keras_weights]
    for g, k in zip(got, keras_weights, strict=True):
        assert np.array_equal(g, k)


def test_infer_equals_keras_predict_at_initial_weights(name: str, split: DigitsSplit) -> None:
    model = get_model_definition(name).build_keras()
    want = model.predict(split.x_test, verbose=0)
    got = Runners(exported_trainable(name)).infer(split.x_test)
    assert got.shape == (len(split.x_test), 10)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_infer_equals_keras_after_set_weights(name: str, split: DigitsSplit) -> None:
    model = get_model_definition(name).build_keras()
    runners = Runners(exported_trainable(name))
    random = _random_weights(model.get_weights(), seed=7)
    runners.set_weights(random)
    _assert_weights_close(runners.get_weights(), random)
    model.set_weights(random)
    np.testing.assert_allclose(
        runners.infer(split.x_test), model.predict(split.x_test, verbose=0), atol=ATOL, rtol=0
    )
    # Weights that came out of training, moved over to Keras.
    for begin in range(0, 8 * BATCH, BATCH):
        runners.train(
            split.x_train[begin : begin + BATCH],
            split.y_train[begin : begin + BATCH],
            np.ones(BATCH),
        )
    trained = runners.get_weights()
    assert not np.allclose(trained[0], random[0])
    model.set_weights(trained)
    np.testing.assert_allclose(
        runners.infer(split.x_test), model.predict(split.x_test, verbose=0), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("start", ["initial", "random"])
def test_one_train_step_equals_one_keras_sgd_step(
    name: str, start: str, split: DigitsSplit
) -> None:
    model = get_model_definition(name).build_keras()  # compiled with SGD(0.05)
    runners = Runners(exported_trainable(name))
    if start == "random":
        weights = _random_weights(model.get_weights(), seed=3)
        model.set_weights(weights)
        runners.set_weights(weights)
    before = model.get_weights()
    x, y = split.x_train[:BATCH], split.y_train[:BATCH]
    keras_loss = model.train_on_batch(x, y, return_dict=True)["loss"]
    loss = runners.train(x, y, np.ones(BATCH))
    after = runners.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(after, before, strict=True))
    _assert_weights_close(after, model.get_weights())
    # Keras reports the loss before the step too.
    assert loss == pytest.approx(float(keras_loss), abs=ATOL)


def test_masked_short_batch_equals_a_keras_step_on_the_short_batch(split: DigitsSplit) -> None:
    model = get_model_definition("digits_cnn").build_keras()
    runners = Runners(exported_trainable("digits_cnn"))
    real = 5
    x = np.zeros((BATCH, 8, 8, 1), np.float32)
    y = np.zeros(BATCH, np.int32)
    # Padding rows with real images and wrong labels proves the mask, not zeros, hides them.
    x[:] = split.x_train[100 : 100 + BATCH]
    y[:real] = split.y_train[:real]
    x[:real] = split.x_train[:real]
    mask = np.zeros(BATCH, np.float32)
    mask[:real] = 1.0
    runners.train(x, y, mask)
    model.train_on_batch(split.x_train[:real], split.y_train[:real])
    _assert_weights_close(runners.get_weights(), model.get_weights())


def test_litert_training_on_digits_reaches_high_accuracy(split: DigitsSplit) -> None:
    trainer = LiteRTTrainer(exported_trainable("digits_cnn"), batch_size=BATCH)
    _, before = trainer.evaluate(split.x_test, split.y_test)
    report = trainer.train(split.x_train, split.y_train, TrainConfig(epochs=5, seed=0))
    _, after = trainer.evaluate(split.x_test, split.y_test)
    assert before < 0.2
    assert after > 0.9
    assert report.steps == 5 * -(-len(split.x_train) // BATCH)


def test_a_different_batch_size_is_exported_as_asked() -> None:
    runners = Runners(exported_trainable("digits_mlp", 4))
    assert list(runners.run["train"].get_input_details()["x"]["shape"]) == [4, 8, 8, 1]
    with pytest.raises(ConfigError, match="at least 1") as info:
        export_trainable_tflite(get_model_definition("digits_mlp"), batch_size=0)
    assert info.value.reason == "bad_batch_size"


def _keras() -> Any:
    import keras

    return keras


def test_unsupported_layers_are_refused_before_conversion() -> None:
    def layer_norm() -> Any:
        keras = _keras()
        return keras.Sequential(
            [
                keras.Input(shape=(8, 8, 1)),
                keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                keras.layers.LayerNormalization(),
                keras.layers.Flatten(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )

    def shaped_dropout() -> Any:
        keras = _keras()
        return keras.Sequential(
            [
                keras.Input(shape=(8, 8, 1)),
                keras.layers.Flatten(),
                keras.layers.Dropout(0.5, noise_shape=(1, 64)),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )

    def logits_head() -> Any:
        keras = _keras()
        return keras.Sequential(
            [keras.Input(shape=(8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
        )

    def two_inputs() -> Any:
        keras = _keras()
        left, right = keras.Input(shape=(8, 8, 1)), keras.Input(shape=(8, 8, 1))
        joined = keras.layers.Flatten()(keras.layers.Add()([left, right]))
        return keras.Model([left, right], keras.layers.Dense(10, activation="softmax")(joined))

    for builder, why in [
        (layer_norm, "not supported"),
        (shaped_dropout, "noise_shape"),
        (logits_head, "softmax"),
        (two_inputs, "one input and one output"),
    ]:
        definition = ModelDefinition("odd", (8, 8, 1), 10, builder)
        with pytest.raises(ModelError, match=why) as info:
            export_trainable_tflite(definition)
        assert info.value.reason == "unsupported_model"


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv_padding_and_kernel_shapes_match_keras(padding: str, split: DigitsSplit) -> None:
    def odd_conv() -> Any:
        keras = _keras()
        return keras.Sequential(
            [
                keras.Input(shape=(8, 8, 1)),
                keras.layers.Conv2D(3, (2, 3), padding=padding),
                keras.layers.Flatten(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )

    definition = ModelDefinition("odd_conv", (8, 8, 1), 10, odd_conv)
    model = definition.build_keras()
    model.set_weights(_random_weights(model.get_weights(), seed=11))
    runners = Runners(export_trainable_tflite(definition, batch_size=2))
    runners.set_weights(model.get_weights())
    np.testing.assert_allclose(
        runners.infer(split.x_test[:50]),
        model.predict(split.x_test[:50], verbose=0),
        atol=ATOL,
        rtol=0,
    )


class _FlexDefinition(ModelDefinition):
    """A definition whose train graph uses Keras's own relu: its gradient is a Flex op."""

    def build_trainable(self, batch_size: int) -> Any:
        import tensorflow as tf

        module = tf.Module()
        module.w = tf.Variable(np.ones((64, 10), np.float32))

        def infer(x: Any) -> Any:
            return {"output": tf.nn.softmax(tf.reshape(x, [-1, 64]) @ module.w)}

        def train(x: Any, y: Any, mask: Any, lr: Any) -> Any:
            with tf.GradientTape() as tape:
                z = tf.nn.relu(tf.reshape(x, [batch_size, 64]) @ module.w)
                loss = tf.reduce_mean(mask * tf.reduce_sum(z, axis=1)) + 0.0 * tf.cast(
                    tf.reduce_sum(y), tf.float32
                )
            module.w.assign_sub(lr * tape.gradient(loss, module.w))
            return {"loss": loss}

        def get_weights() -> Any:
            return {"w0": tf.identity(module.w)}

        def set_weights(w0: Any) -> Any:
            module.w.assign(w0)
            return {"count": tf.constant(1)}

        spec = tf.TensorSpec
        module.infer = tf.function(infer, input_signature=[spec([None, 8, 8, 1], tf.float32)])
        module.train = tf.function(
            train,
            input_signature=[
                spec([batch_size, 8, 8, 1], tf.float32),
                spec([batch_size], tf.int32),
                spec([batch_size], tf.float32),
                spec([], tf.float32),
            ],
        )
        module.get_weights = tf.function(get_weights, input_signature=[])
        module.set_weights = tf.function(set_weights, input_signature=[spec([64, 10], tf.float32)])
        return module


def test_a_flex_op_in_the_gradient_fails_the_export() -> None:
    definition = _FlexDefinition("flex", (8, 8, 1), 10, lambda: None)
    with pytest.raises(ModelError, match=r"not TFLite builtins \(ReluGrad\)") as info:
        export_trainable_tflite(definition, batch_size=2)
    assert info.value.reason == "convert"
