"""The agent's federated client: its dataset from the sample store, and round bookkeeping."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

from agent.federated import FederatedClient
from agent.store import SampleStore
from coordinator.reference import digit_images_uint8, digit_png, load_digits_split
from coordinator.tflite_export import ReferenceModels
from protocol.errors import FedgeError
from protocol.messages.rounds import BlobRef, ModelRelease, RoundAnnouncement, RoundConfig
from protocol.preprocess import ColorOrder, PreprocessSpec
from protocol.signing import SigningKey
from protocol.topics import Topics
from protocol.updates import encode_weights
from runtime.mqtt import MqttLink, parse_broker_url

SHA = "ab" * 32


@pytest.fixture
def client(tmp_path: Path) -> FederatedClient:
    split = load_digits_split()
    store = SampleStore(tmp_path / "samples")
    for image, label in zip(
        digit_images_uint8(split.x_train[:30]), split.y_train[:30], strict=True
    ):
        store.add(digit_png(image), label=str(int(label)))
    store.add(digit_png(digit_images_uint8(split.x_train[30:31])[0]), label="cat")
    link = MqttLink(parse_broker_url("mqtt://127.0.0.1:1"), client_id="unused")  # never started
    return FederatedClient(
        agent_id="a1",
        topics=Topics(fleet="t"),
        link=link,
        publish_reliably=lambda _t, _p: None,
        report_error=lambda _r, _m: None,
        store=store,
        data_dir=tmp_path / "federated",
        verify_key=SigningKey.generate().public_key,
        trainer_kind="litert",
    )


def _release() -> ModelRelease:
    ref = BlobRef(sha256=SHA, size_bytes=1, chunk_count=1, chunk_bytes=100)
    return ModelRelease(
        version="r1",
        model_name="digits_cnn",
        round=1,
        weights=ref,
        trainable=ref,
        labels=tuple(str(i) for i in range(10)),
        preprocess=PreprocessSpec(height=8, width=8, color=ColorOrder.GRAY),
    )


def test_dataset_holds_the_stores_samples_with_the_releases_labels(
    client: FederatedClient,
) -> None:
    x, y = client.dataset(_release())
    assert x.shape[1:] == (8, 8, 1)
    assert x.dtype == np.float32
    assert len(x) == len(y)
    assert (
        25 <= len(x) <= 30
    )  # near-duplicate digits are refused by the store; "cat" is not a label
    assert set(y.tolist()) <= set(range(10))
    x_again, y_again = client.dataset(_release())
    assert np.array_equal(x, x_again)
    assert np.array_equal(y, y_again)


def test_augmented_dataset_is_seeded_and_differs_from_the_plain_one(
    client: FederatedClient,
) -> None:
    plain, _ = client.dataset(_release())
    first, labels = client.dataset(_release(), augment_seed=3)
    second, _ = client.dataset(_release(), augment_seed=3)
    other, _ = client.dataset(_release(), augment_seed=4)
    assert first.shape == plain.shape
    assert np.array_equal(first, second)
    assert not np.array_equal(first, plain)
    assert not np.array_equal(first, other)
    assert len(labels) == len(plain)


def _transfer_announcement(
    client: FederatedClient,
    tmp_path: Path,
    backbone: bytes,
    labels: tuple[str, ...],
    *,
    min_samples: int = 1,
) -> RoundAnnouncement:
    """A transfer round whose blobs are already in the agent's cache."""
    head = encode_weights(
        [np.zeros((10, len(labels)), np.float32), np.zeros(len(labels), np.float32)]
    )
    refs = []
    for blob in (head, backbone):
        sha = hashlib.sha256(blob).hexdigest()
        (tmp_path / "federated" / "blobs" / sha).write_bytes(blob)
        refs.append(BlobRef(sha256=sha, size_bytes=len(blob), chunk_count=1, chunk_bytes=len(blob)))
    release = ModelRelease(
        version="r0",
        model_name="task",
        recipe="transfer",
        round=0,
        weights=refs[0],
        trainable=refs[1],
        labels=labels,
        preprocess=PreprocessSpec(height=8, width=8, color=ColorOrder.GRAY),
    )
    return RoundAnnouncement(
        round=1,
        release=release,
        selected=("a1",),
        config=RoundConfig(min_samples=min_samples),
        deadline_at=time.time() + 600,
        issued_at=time.time(),
    )


def test_an_agent_without_the_tasks_labels_sits_out_with_a_reason(
    client: FederatedClient, tmp_path: Path, reference_models: ReferenceModels
) -> None:
    backbone = reference_models.digits_float32.read_bytes()
    nothing = _transfer_announcement(client, tmp_path, backbone, ("door", "parcel"))
    with pytest.raises(FedgeError, match="0 samples of the task's labels") as caught:
        client._on_announcement(nothing)
    assert caught.value.reason == "no_samples"
    assert "cat" in str(caught.value)  # other labels are counted and named
    few = _transfer_announcement(client, tmp_path, backbone, ("cat", "0"), min_samples=1000)
    with pytest.raises(FedgeError, match="the round needs 1000") as caught:
        client._on_announcement(few)
    assert caught.value.reason == "too_few_samples"
