"""One serving .tflite from a backbone and heads: the flatbuffer composition and the merge.

Backbones are real TFLite models made by TensorFlow: a small CNN whose output is a feature
map (so the composed model pools it), as float32 and as full-integer int8. Every composed
model is checked against the backbone run alone, then the head in NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.head import HeadTrainer
from agent.runtime import TfliteModel
from agent.transfer_task import Backbone
from coordinator.task_producers import head_initial_weights
from coordinator.tflite_export import export_float_tflite, export_int8_tflite
from coordinator.variants import quantize_int8
from protocol.errors import ModelError
from runtime.composition import Head, compose
from runtime.merging import merge_models, read_composed, without_record

FLOAT_TOLERANCE = 1e-5
SIDE = 16


def _feature_map_cnn(seed: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIDE, SIDE, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    outputs = keras.layers.Conv2D(12, 3, padding="same", activation="relu")(h)
    return keras.Model(inputs, outputs)  # (n, 8, 8, 12): a feature map, not pooled


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, (24, SIDE, SIDE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def backbones(images: np.ndarray) -> dict[str, bytes]:
    cnn = _feature_map_cnn(0)
    return {
        "float": export_float_tflite(cnn),
        "int8": export_int8_tflite(cnn, images),
        "other": export_float_tflite(_feature_map_cnn(1)),
    }


def _head(name: str, hidden: tuple[int, ...], classes: int, seed: int) -> Head:
    rng = np.random.default_rng(seed)
    weights = head_initial_weights(12, hidden, classes, seed=seed)
    # Non-zero biases, so a bias in the wrong place would show.
    weights = [w + rng.normal(0.0, 0.2, w.shape).astype(np.float32) for w in weights]
    return Head(name, tuple(weights), tuple(f"{name}-{i}" for i in range(classes)))


def _run(tflite: bytes, x: np.ndarray) -> list[np.ndarray]:
    model = TfliteModel.from_bytes(tflite)
    outs = [model.predict(sample[None]) for sample in x]
    return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def _separately(backbone: bytes, head: Head, x: np.ndarray) -> np.ndarray:
    return HeadTrainer(list(head.weights)).predict(Backbone(backbone).embed(x))


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_one_invoke_equals_the_backbone_then_the_head(
    backbones: dict[str, bytes], images: np.ndarray, kind: str
) -> None:
    head = _head("door", (6,), 3, seed=1)
    composed = compose(backbones[kind], [head])
    model = TfliteModel.from_bytes(composed)
    assert [o.name for o in model.output_details] == ["door"]
    assert model.input_details.dtype == ("int8" if kind == "int8" else "float32")
    (one,) = _run(composed, images)
    np.testing.assert_allclose(
        one, _separately(backbones[kind], head, images), atol=FLOAT_TOLERANCE
    )
    np.testing.assert_allclose(one.sum(axis=1), 1.0, atol=1e-5)


def test_a_composed_model_gives_back_its_backbone_and_heads(
    backbones: dict[str, bytes], images: np.ndarray
) -> None:
    head = _head("door", (), 4, seed=2)
    parts = read_composed(compose(backbones["float"], [head]))
    assert parts.heads[0].name == "door"
    assert parts.heads[0].labels == head.labels
    for got, want in zip(parts.heads[0].weights, head.weights, strict=True):
        np.testing.assert_array_equal(got, want)
    (features,) = TfliteModel.from_bytes(parts.backbone).predict(images[:1])
    (reference,) = TfliteModel.from_bytes(backbones["float"]).predict(images[:1])
    np.testing.assert_array_equal(features, reference)


def test_merged_heads_equal_the_separate_models(
    backbones: dict[str, bytes], images: np.ndarray
) -> None:
    door, parcel = _head("door", (6,), 3, seed=3), _head("parcel", (), 2, seed=4)
    merged = merge_models(
        [compose(backbones["float"], [door]), compose(backbones["float"], [parcel])]
    )
    assert [o.name for o in TfliteModel.from_bytes(merged).output_details] == ["door", "parcel"]
    got_door, got_parcel = _run(merged, images)
    np.testing.assert_allclose(
        got_door, _separately(backbones["float"], door, images), atol=FLOAT_TOLERANCE
    )
    np.testing.assert_allclose(
        got_parcel, _separately(backbones["float"], parcel, images), atol=FLOAT_TOLERANCE
    )
    # A merged model merges again: its heads are read back like any composed model's.
    third = _head("bird", (), 2, seed=5)
    again = merge_models([merged, compose(backbones["float"], [third])])
    assert [h.name for h in read_composed(again).heads] == ["door", "parcel", "bird"]


def test_models_that_share_no_backbone_are_refused(backbones: dict[str, bytes]) -> None:
    door, parcel = _head("door", (), 3, seed=6), _head("parcel", (), 2, seed=7)
    with pytest.raises(ModelError, match="share no backbone") as caught:
        merge_models(
            [compose(backbones["float"], [door]), compose(backbones["other"], [parcel])],
            names=["door.tflite", "parcel.tflite"],
        )
    assert caught.value.reason == "no_shared_backbone"
    assert "door.tflite" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_what_cannot_be_merged_or_composed_is_refused_with_a_reason(
    backbones: dict[str, bytes],
) -> None:
    door = compose(backbones["float"], [_head("door", (), 3, seed=8)])
    with pytest.raises(ModelError) as plain:
        merge_models([door, backbones["float"]], names=["door.tflite", "backbone.tflite"])
    assert plain.value.reason == "not_composed"
    assert str(plain.value).startswith("backbone.tflite: ")
    quantised = quantize_int8(door).tflite
    with pytest.raises(ModelError) as still_recorded:
        merge_models([door, quantised])
    assert still_recorded.value.reason == "quantised"
    with pytest.raises(ModelError) as stripped:
        merge_models([door, without_record(quantised)])
    assert stripped.value.reason == "not_composed"
    with pytest.raises(ModelError) as same_task:
        merge_models([door, door])
    assert same_task.value.reason == "bad_merge"
    with pytest.raises(ModelError) as misfit:
        compose(backbones["float"], [Head("door", (np.zeros((5, 3), np.float32), np.zeros(3)))])
    assert misfit.value.reason == "bad_weights"
    with pytest.raises(ModelError) as garbage:
        compose(b"not a model", [_head("door", (), 3, seed=9)])
    assert garbage.value.reason == "bad_model"
