"""The NumPy head trains exactly as Keras does on the same weights and batches.

With standardised steps (the default), exactly as Keras does on standardised features from
the mapped weights, mapped back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.head import HeadTrainer
from agent.training import KerasTrainer, TrainConfig
from protocol.errors import ModelError


def _keras_head(features: int, hidden: tuple[int, ...], classes: int) -> Any:
    import keras

    layers: list[Any] = [keras.Input((features,))]
    layers += [keras.layers.Dense(units, activation="relu") for units in hidden]
    layers.append(keras.layers.Dense(classes, activation="softmax"))
    return keras.Sequential(layers)


@pytest.mark.parametrize("hidden", [(), (12,), (12, 7)], ids=["linear", "one", "two"])
@pytest.mark.parametrize("mu", [0.0, 0.5], ids=["sgd", "fedprox"])
def test_head_steps_match_keras_to_1e5(hidden: tuple[int, ...], mu: float) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data[:203] / 16.0).astype(np.float32)
    y = (digits.target[:203] % 5).astype(np.int32)
    keras_trainer = KerasTrainer(lambda: _keras_head(64, hidden, 5))
    head = HeadTrainer(keras_trainer.get_weights(), standardise=False)
    config = TrainConfig(
        epochs=2, batch_size=16, learning_rate=0.3, proximal_mu=mu, validation_fraction=0.1
    )
    ours = head.train(x, y, config)
    theirs = keras_trainer.train(x, y, config)
    for a, b in zip(head.get_weights(), keras_trainer.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert ours.loss == pytest.approx(theirs.loss, abs=1e-5)
    assert ours.val_accuracy == theirs.val_accuracy
    np.testing.assert_allclose(head.predict(x), keras_trainer.predict(x), atol=1e-5)


def _digits_features() -> tuple[np.ndarray, np.ndarray]:
    """Features with the offsets and unequal spreads a backbone gives (and two constant ones)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data[:203] / 16.0 * np.linspace(0.2, 2.0, 64) + np.linspace(0.0, 3.0, 64)
    return x.astype(np.float32), (digits.target[:203] % 5).astype(np.int32)


@pytest.mark.parametrize("hidden", [(), (12,)], ids=["linear", "one"])
def test_standardised_steps_are_keras_steps_on_standardised_features(
    hidden: tuple[int, ...],
) -> None:
    x, y = _digits_features()
    keras_trainer = KerasTrainer(lambda: _keras_head(64, hidden, 5))
    start = [w.astype(np.float64) for w in keras_trainer.get_weights()]
    head = HeadTrainer(keras_trainer.get_weights())
    mean, spread = x.astype(np.float64).mean(axis=0), x.astype(np.float64).std(axis=0)
    scale = np.where(spread > 1e-3 * spread.max(), spread, 1.0)
    assert (scale == 1.0).sum() >= 2  # the constant pixels are centred, never divided by ~0
    keras_trainer.set_weights([start[0] * scale[:, None], start[1] + mean @ start[0], *start[2:]])
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=0.05, validation_fraction=0.1)
    ours = head.train(x, y, config)
    theirs = keras_trainer.train(((x - mean) / scale).astype(np.float32), y, config)
    trained = [w.astype(np.float64) for w in keras_trainer.get_weights()]
    kernel = trained[0] / scale[:, None]
    mapped_back = [kernel, trained[1] - mean @ kernel, *trained[2:]]
    for a, b in zip(head.get_weights(), mapped_back, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert ours.loss == pytest.approx(theirs.loss, abs=1e-5)
    np.testing.assert_allclose(
        head.predict(x),
        keras_trainer.predict(((x - mean) / scale).astype(np.float32)),
        atol=1e-5,
    )


def test_standardising_leaves_the_function_unchanged() -> None:
    x, y = _digits_features()
    rng = np.random.default_rng(3)
    weights = [rng.normal(0, 0.1, (64, 5)).astype(np.float32), np.zeros(5, np.float32)]
    head = HeadTrainer(weights)
    before = head.predict(x)
    # A step too small to move anything: what is left is the maps there and back.
    head.train(x, y, TrainConfig(learning_rate=1e-12))
    np.testing.assert_allclose(head.predict(x), before, atol=1e-6)


def test_weights_that_do_not_chain_are_refused() -> None:
    with pytest.raises(ModelError, match="do not chain"):
        HeadTrainer([np.zeros((4, 3)), np.zeros(3), np.zeros((5, 2)), np.zeros(2)])
    with pytest.raises(ModelError, match="kernel and bias pairs"):
        HeadTrainer([np.zeros((4, 3))])
