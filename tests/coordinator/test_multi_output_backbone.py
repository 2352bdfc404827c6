"""A backbone with several outputs: its features are all of them, joined in output order.

The agent's :class:`~agent.transfer_task.Backbone`, the coordinator's task check and the
release's one serving ``.tflite`` (:func:`runtime.composition.compose`) must agree on that
order and on the pooling, or a head trained on the agents would be served over other
features.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from agent.head import HeadTrainer
from agent.runtime import TfliteModel
from agent.transfer_task import Backbone
from coordinator.task_producers import head_initial_weights
from coordinator.tasks import inspect_backbone
from coordinator.tflite_export import export_float_tflite
from runtime.composition import Head, compose
from runtime.merging import read_composed

CLASSES = 3


@pytest.fixture(scope="module")
def two_output_backbone() -> bytes:
    """16x16 RGB in; a feature map (n, 8, 8, 4) and a feature vector (n, 6) out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(3)
    frames = keras.Input((16, 16, 3))
    fmap = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(frames)
    vector = keras.layers.Dense(6)(keras.layers.Flatten()(fmap))
    model: Any = keras.Model(frames, [fmap, vector])
    return export_float_tflite(model)


def test_every_output_is_a_feature_and_the_serving_model_agrees(
    two_output_backbone: bytes,
) -> None:
    info = inspect_backbone(two_output_backbone)
    backbone = Backbone(two_output_backbone)
    assert info.feature_size == backbone.feature_size == 4 + 6
    frames = np.random.default_rng(0).uniform(0, 1, (5, 16, 16, 3)).astype(np.float32)
    features = backbone.embed(frames)
    assert len(TfliteModel.from_bytes(two_output_backbone).output_details) == 2
    weights = head_initial_weights(backbone.feature_size, (5,), CLASSES, seed=1)
    weights = [w + 0.1 for w in weights]  # non-zero biases too
    head = HeadTrainer(weights)
    composed = TfliteModel.from_bytes(compose(two_output_backbone, [Head("task", tuple(weights))]))
    served = np.concatenate([composed.predict(frame)[0] for frame in frames])
    np.testing.assert_allclose(served, head.predict(features), atol=1e-5)
    taken = read_composed(compose(two_output_backbone, [Head("task", tuple(weights))]))
    assert Backbone(taken.backbone).feature_size == backbone.feature_size
    np.testing.assert_allclose(Backbone(taken.backbone).embed(frames), features, atol=1e-6)
