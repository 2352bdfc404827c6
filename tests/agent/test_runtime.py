"""The inference runtime on real models, and the postprocessing of their outputs."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from agent.postprocess import (
    FULL_VALUES_MAX,
    HEAD_VALUES,
    Prediction,
    classify,
    is_classifier,
    summarize_output,
)
from agent.runtime import TensorInfo, TfliteModel, load_interpreter_class, load_labels
from coordinator.reference import DigitsSplit, build_reference_cnn, load_digits_split
from coordinator.tflite_export import ReferenceModels, build_two_output_model
from protocol.errors import ConfigError, ModelError


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


@pytest.fixture(scope="module")
def float_model(reference_models: ReferenceModels) -> TfliteModel:
    return TfliteModel.from_path(reference_models.digits_float32)


def _accuracy(model: TfliteModel, split: DigitsSplit) -> float:
    (probs,) = model.predict(split.x_test)
    return float(np.mean(np.argmax(probs, axis=1) == split.y_test))


# --- runtime selection -------------------------------------------------------------------


def test_litert_is_the_first_choice() -> None:
    runtime = load_interpreter_class()
    assert runtime.name == "litert"
    assert runtime.version[0].isdigit()
    assert runtime.interpreter_class.__module__.startswith("ai_edge_litert")


def test_a_named_runtime_is_used_or_refused() -> None:
    assert load_interpreter_class("tensorflow").name == "tensorflow"
    with pytest.raises(ConfigError, match="unknown runtime"):
        load_interpreter_class("onnx")
    if importlib.util.find_spec("tflite_runtime") is None:
        with pytest.raises(ModelError, match="tflite_runtime") as info:
            load_interpreter_class("tflite_runtime")
        assert info.value.reason == "no_runtime"
    else:
        assert load_interpreter_class("tflite_runtime").name == "tflite_runtime"


# --- the digits models -------------------------------------------------------------------


def test_float_model_declares_its_tensors(float_model: TfliteModel) -> None:
    assert float_model.runtime.name == "litert"
    assert float_model.input_details.shape == (1, 8, 8, 1)
    assert float_model.input_details.dtype == "float32"
    assert not float_model.input_details.quantized
    (output,) = float_model.output_details
    assert (output.shape, output.dtype, output.scale) == ((1, 10), "float32", 0.0)
    assert is_classifier(float_model.output_details)


def test_int8_model_declares_its_quantisation(reference_models: ReferenceModels) -> None:
    model = TfliteModel.from_path(reference_models.digits_int8)
    info = model.input_details
    assert (info.dtype, info.zero_point) == ("int8", -128)
    assert info.scale == pytest.approx(1 / 255, rel=1e-3)
    assert info.quantized
    (output,) = model.output_details
    assert output.dtype == "int8"
    assert output.quantized
    assert model.size_bytes < TfliteModel.from_path(reference_models.digits_float32).size_bytes


def test_float32_model_classifies_held_out_digits(
    float_model: TfliteModel, split: DigitsSplit
) -> None:
    assert _accuracy(float_model, split) >= 0.9


@pytest.mark.parametrize("variant", ["digits_int8", "digits_uint8"])
def test_quantised_models_classify_as_well_as_float32(
    reference_models: ReferenceModels, float_model: TfliteModel, split: DigitsSplit, variant: str
) -> None:
    model = TfliteModel.from_path(getattr(reference_models, variant))
    accuracy = _accuracy(model, split)
    assert accuracy >= 0.9
    assert abs(accuracy - _accuracy(float_model, split)) <= 0.02
    (probs,) = model.predict(split.x_test[:50])
    assert probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=0.05)


def test_float32_predictions_equal_the_keras_model(
    reference_models: ReferenceModels, float_model: TfliteModel, split: DigitsSplit
) -> None:
    keras_model = build_reference_cnn()
    keras_model.set_weights(reference_models.load_digits_weights())
    expected = keras_model.predict(split.x_test, verbose=0)
    (actual,) = float_model.predict(split.x_test)
    assert actual.shape == expected.shape == (450, 10)
    assert np.allclose(actual, expected, atol=1e-5)


def test_tensorflow_runtime_gives_the_same_outputs(
    reference_models: ReferenceModels, float_model: TfliteModel, split: DigitsSplit
) -> None:
    model = TfliteModel.from_path(reference_models.digits_int8, runtime="tensorflow")
    assert model.runtime.name == "tensorflow"
    litert = TfliteModel.from_path(reference_models.digits_int8)
    (a,) = model.predict(split.x_test[:32])
    (b,) = litert.predict(split.x_test[:32])
    assert np.array_equal(a, b)


def test_batches_with_and_without_batch_dimension_agree(
    float_model: TfliteModel, split: DigitsSplit
) -> None:
    x = split.x_test[:7]
    (single,) = float_model.predict(x[0])
    assert single.shape == (1, 10)
    (batch,) = float_model.predict(x)
    assert batch.shape == (7, 10)
    one_by_one = np.concatenate([float_model.predict(sample)[0] for sample in x])
    assert np.allclose(batch, one_by_one, atol=1e-6)
    assert np.allclose(single[0], batch[0], atol=1e-6)


def test_quantised_input_is_clipped_to_the_tensor_range(
    reference_models: ReferenceModels,
) -> None:
    model = TfliteModel.from_path(reference_models.digits_uint8)
    (saturated,) = model.predict(np.full((8, 8, 1), 3.0, np.float32))
    (white,) = model.predict(np.ones((8, 8, 1), np.float32))
    (below,) = model.predict(np.full((8, 8, 1), -1.0, np.float32))
    (black,) = model.predict(np.zeros((8, 8, 1), np.float32))
    assert np.array_equal(saturated, white)
    assert np.array_equal(below, black)
    assert not np.array_equal(white, black)


def test_concurrent_callers_get_their_own_results(
    float_model: TfliteModel, split: DigitsSplit
) -> None:
    x = split.x_test[:40]
    (expected,) = float_model.predict(x)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for step in range(20):
                # Alternating batch sizes force resizes while other threads invoke.
                size = 1 + (k + step) % 5
                (out,) = float_model.predict(x[k : k + size])
                assert np.allclose(out, expected[k : k + size], atol=1e-6)
            results[k] = out
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sorted(results) == [0, 1, 2, 3]


# --- a model that is not a square classifier ---------------------------------------------


def test_two_output_nonsquare_model_returns_both_heads_in_model_order(
    reference_models: ReferenceModels,
) -> None:
    model = TfliteModel.from_path(reference_models.two_output)
    assert model.input_details.shape == (1, 12, 20, 3)
    assert [o.shape for o in model.output_details] == [(1, 4), (1, 2)]
    assert not is_classifier(model.output_details)
    x = np.random.default_rng(0).random((3, 12, 20, 3), dtype=np.float32)
    # A fixed batch of one: a batch of three runs slice by slice.
    probs, values = model.predict(x)
    assert probs.shape == (3, 4)
    assert values.shape == (3, 2)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    keras_probs, keras_values = build_two_output_model().predict(x[:1], verbose=0)
    assert np.allclose(probs[:1], keras_probs, atol=1e-5)
    assert np.allclose(values[:1], keras_values, atol=1e-5)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"this is not a flatbuffer at all" * 10,
        np.random.default_rng(1).bytes(4096),
    ],
    ids=["empty", "text", "random"],
)
def test_bytes_that_are_not_a_model_raise_model_error(data: bytes) -> None:
    with pytest.raises(ModelError) as info:
        TfliteModel.from_bytes(data)
    assert info.value.reason == "bad_model"


def test_a_truncated_model_raises_model_error(reference_models: ReferenceModels) -> None:
    data = reference_models.digits_float32.read_bytes()
    with pytest.raises(ModelError, match="not a usable TFLite model"):
        TfliteModel.from_bytes(data[: len(data) // 2])


def test_a_missing_model_file_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read model"):
        TfliteModel.from_path(tmp_path / "absent.tflite")


def test_bad_thread_count_is_a_config_error(reference_models: ReferenceModels) -> None:
    with pytest.raises(ConfigError, match="num_threads"):
        TfliteModel.from_path(reference_models.digits_float32, num_threads=0)


@pytest.mark.parametrize(
    "shape", [(1, 8, 9, 1), (8, 8), (64,), (0, 8, 8, 1), (2, 8, 8, 3), (1, 1, 8, 8, 1)]
)
def test_wrong_input_shape_raises_model_error(
    float_model: TfliteModel, shape: tuple[int, ...]
) -> None:
    with pytest.raises(ModelError, match="does not fit") as info:
        float_model.predict(np.zeros(shape, np.float32))
    assert info.value.reason == "bad_input_shape"


def test_non_numeric_input_raises_model_error(float_model: TfliteModel) -> None:
    with pytest.raises(ModelError, match="not numeric"):
        float_model.predict(np.full((8, 8, 1), "x"))


# --- labels ------------------------------------------------------------------------------


def test_labels_are_read_one_per_line(reference_models: ReferenceModels, tmp_path: Path) -> None:
    assert load_labels(reference_models.labels) == tuple("0123456789")
    path = tmp_path / "labels.txt"
    path.write_text("  cat \n\ndog\n\n", encoding="utf-8")
    assert load_labels(path) == ("cat", "dog")
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ModelError, match="no labels"):
        load_labels(path)
    with pytest.raises(ModelError, match="cannot read labels"):
        load_labels(tmp_path / "absent.txt")


# --- postprocessing ----------------------------------------------------------------------


def test_classify_ranks_probabilities_with_labels() -> None:
    probs = np.array([[0.1, 0.6, 0.05, 0.25]], np.float32)
    result = classify(probs, ["a", "b", "c", "d"], top_k=3)
    assert [(p.index, p.label) for p in result] == [(1, "b"), (3, "d"), (0, "a")]
    assert result[0].score == pytest.approx(0.6)


def test_classify_applies_softmax_to_logits_only() -> None:
    logits = np.array([2.0, -1.0, 0.5])
    result = classify(logits, None, top_k=3)
    expected = np.exp(logits) / np.exp(logits).sum()
    assert [p.index for p in result] == [0, 2, 1]
    assert [p.label for p in result] == ["0", "2", "1"]
    assert [p.score for p in result] == pytest.approx(expected[[0, 2, 1]].tolist())
    # Dequantised int8 softmax: off 1 by a few steps, still probabilities.
    int8_like = np.array([0.0, 0.98046875, 0.0078125])
    assert classify(int8_like, None, top_k=1)[0].score == pytest.approx(0.98046875)


def test_classify_threshold_top_k_ties_and_missing_labels() -> None:
    probs = np.array([0.3, 0.3, 0.3, 0.1])
    assert [p.index for p in classify(probs, ["a"], top_k=10)] == [0, 1, 2, 3]
    assert classify(probs, ["a"], top_k=10)[3] == Prediction(index=3, label="3", score=0.1)
    assert [p.index for p in classify(probs, None, threshold=0.2, top_k=10)] == [0, 1, 2]
    assert classify(probs, None, threshold=0.5) == []


@pytest.mark.parametrize(
    "scores", [np.array([1.0]), np.zeros((2, 3)), np.zeros((1, 2, 2)), np.array([np.nan, 1.0])]
)
def test_classify_refuses_what_is_not_one_row_of_scores(scores: np.ndarray) -> None:
    with pytest.raises(ModelError):
        classify(scores, None)


def test_classify_refuses_a_zero_top_k() -> None:
    with pytest.raises(ValueError, match="top_k"):
        classify(np.array([0.5, 0.5]), None, top_k=0)


@settings(max_examples=200, deadline=None)
@given(
    arrays(
        np.float32,
        st.integers(2, 40),
        elements=st.floats(-1e4, 1e4, width=32, allow_nan=False),
    ),
    st.integers(1, 5),
)
def test_classify_returns_sorted_probabilities_for_any_finite_scores(
    scores: np.ndarray, top_k: int
) -> None:
    result = classify(scores, None, top_k=top_k)
    assert len(result) == min(top_k, scores.size)
    ranked = [p.score for p in result]
    assert ranked == sorted(ranked, reverse=True)
    assert all(0.0 <= s <= 1.0 + 1e-6 for s in ranked)


def test_is_classifier_rule() -> None:
    def info(*shape: int) -> TensorInfo:
        return TensorInfo(name="out", shape=shape, dtype="float32", scale=0.0, zero_point=0)

    assert is_classifier([info(1, 10)])
    assert is_classifier([info(1, 2)])
    assert not is_classifier([info(1, 1)])
    assert not is_classifier([info(10)])
    assert not is_classifier([info(1, 1, 10)])
    assert not is_classifier([info(1, 4), info(1, 2)])
    assert not is_classifier([])


def test_summarize_small_output_keeps_every_value() -> None:
    summary = summarize_output(np.array([[1.5, -2.0]], np.float32), name="regression")
    assert summary.name == "regression"
    assert summary.shape == (1, 2)
    assert summary.dtype == "float32"
    assert summary.values == (1.5, -2.0)
    assert not summary.truncated
    assert (summary.min, summary.max, summary.mean) == (-2.0, 1.5, -0.25)


def test_summarize_large_output_gives_stats_and_a_head() -> None:
    arr = np.arange(2 * FULL_VALUES_MAX, dtype=np.int32).reshape(1, 2, -1)
    summary = summarize_output(arr)
    assert summary.truncated
    assert summary.values == tuple(float(v) for v in range(HEAD_VALUES))
    assert summary.dtype == "int32"
    assert summary.min == 0.0
    assert summary.max == 2 * FULL_VALUES_MAX - 1
    assert summary.mean == pytest.approx(arr.mean())
    assert summary.std == pytest.approx(arr.std())
    assert json.loads(json.dumps(summary.as_dict()))["shape"] == [1, 2, FULL_VALUES_MAX]


def test_summarize_empty_output_has_no_stats() -> None:
    summary = summarize_output(np.zeros((1, 0), np.float32))
    assert summary.values == ()
    assert summary.min is None
    assert summary.std is None
