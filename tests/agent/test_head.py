"""The NumPy head trains exactly as Keras does on the same weights and batches."""

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
    head = HeadTrainer(keras_trainer.get_weights())
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


def test_weights_that_do_not_chain_are_refused() -> None:
    with pytest.raises(ModelError, match="do not chain"):
        HeadTrainer([np.zeros((4, 3)), np.zeros(3), np.zeros((5, 2)), np.zeros(2)])
    with pytest.raises(ModelError, match="kernel and bias pairs"):
        HeadTrainer([np.zeros((4, 3))])
