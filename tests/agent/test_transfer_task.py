"""Transfer tasks on the agent: embeddings cached per backbone, heads checked against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.preprocess import decode_image, prepare_input
from agent.store import SampleStore
from agent.transfer_task import Backbone, TransferTasks
from coordinator.tflite_export import ReferenceModels
from protocol.errors import ModelError
from protocol.messages.rounds import BlobRef, ModelRelease
from protocol.preprocess import ColorOrder, PreprocessSpec
from tests.agent.agent_helpers import held_out_digits

_SPEC = PreprocessSpec(height=8, width=8, color=ColorOrder.GRAY)


def _release(backbone: bytes, sha: str, labels: tuple[str, ...]) -> ModelRelease:
    ref = BlobRef(sha256=sha, size_bytes=len(backbone), chunk_count=1, chunk_bytes=len(backbone))
    return ModelRelease(
        version="r1",
        model_name="t",
        recipe="transfer",
        round=1,
        weights=ref,
        trainable=ref,
        labels=labels,
        preprocess=_SPEC,
    )


@pytest.fixture
def store(tmp_path: Path) -> SampleStore:
    store = SampleStore(tmp_path / "samples")
    images, truth = held_out_digits(40)
    for image, label in zip(images, truth, strict=True):
        store.add(image, label=str(label))
    return store


def test_embeddings_are_computed_once_per_backbone_and_match_it(
    tmp_path: Path, store: SampleStore, reference_models: ReferenceModels
) -> None:
    content = reference_models.digits_float32.read_bytes()
    fetched: list[str] = []

    def fetch(ref: BlobRef) -> bytes:
        fetched.append(ref.sha256)
        return content

    tasks = TransferTasks(store=store, data_dir=tmp_path, fetch=fetch)
    release = _release(content, "a" * 64, ("0", "1", "2", "3"))
    x, y, _ = tasks.dataset(release)
    wanted = [s for s in store.samples() if s.label in release.labels]
    assert len(x) == len(wanted) == len(y)
    cache = tmp_path / "embeddings" / ("a" * 64)
    assert len(list(cache.glob("*.npy"))) == len(wanted)
    # The cached embedding is the backbone's output for the sample's preprocessed image.
    first = sorted(wanted, key=lambda s: s.sample_id)[0]
    image = prepare_input(decode_image(store.load_image(first)), _SPEC)
    expected = Backbone(content).embed(image[np.newaxis])[0]
    np.testing.assert_allclose(x[0], expected, atol=1e-6)
    # Again: read from the cache (the same values), the backbone fetched once.
    again, _, _ = tasks.dataset(release)
    np.testing.assert_array_equal(again, x)
    assert fetched == ["a" * 64]
    # A new backbone version gets its own embeddings.
    tasks.dataset(_release(content, "b" * 64, release.labels))
    assert len(list((tmp_path / "embeddings" / ("b" * 64)).glob("*.npy"))) == len(wanted)


def test_a_head_that_does_not_fit_the_backbone_is_refused(
    tmp_path: Path, store: SampleStore, reference_models: ReferenceModels
) -> None:
    content = reference_models.digits_float32.read_bytes()
    tasks = TransferTasks(store=store, data_dir=tmp_path, fetch=lambda _ref: content)
    release = _release(content, "c" * 64, ("0", "1", "2"))
    with pytest.raises(ModelError, match="does not fit a backbone of 10 features"):
        tasks.trainer(release, [np.zeros((7, 3), np.float32), np.zeros(3, np.float32)])
    head = tasks.trainer(release, [np.zeros((10, 3), np.float32), np.zeros(3, np.float32)])
    assert head.num_classes == 3


def test_a_backbone_the_release_spec_cannot_feed_is_refused(
    tmp_path: Path, store: SampleStore, reference_models: ReferenceModels
) -> None:
    content = reference_models.digits_float32.read_bytes()
    tasks = TransferTasks(store=store, data_dir=tmp_path, fetch=lambda _ref: content)
    wrong = _release(content, "d" * 64, ("0", "1")).model_copy(
        update={"preprocess": PreprocessSpec(height=64, width=64)}
    )
    with pytest.raises(ModelError, match="does not feed the backbone"):
        tasks.dataset(wrong)


def test_an_int8_backbone_gives_the_float_backbones_features(
    reference_models: ReferenceModels,
) -> None:
    images, _ = held_out_digits(20)
    x = np.stack([prepare_input(decode_image(image), _SPEC) for image in images])
    float_features = Backbone(reference_models.digits_float32.read_bytes()).embed(x)
    int8 = Backbone(reference_models.digits_int8.read_bytes())
    assert int8.model.input_details.dtype == "int8"
    int8_features = int8.embed(x)
    assert int8_features.shape == float_features.shape
    # Quantisation moves each feature a little; the features still agree on each image.
    np.testing.assert_allclose(int8_features, float_features, atol=0.1)
    assert (np.argmax(int8_features, axis=1) == np.argmax(float_features, axis=1)).mean() >= 0.9
