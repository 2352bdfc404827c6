"""The agent's side of a ``transfer`` task: a frozen backbone, cached embeddings, a head.

A transfer release's ``trainable`` blob is the backbone ``.tflite`` (fetched once and kept
by hash) and its ``weights`` are the head's. The backbone runs in LiteRT for inference only
(float or int8: :class:`agent.runtime.TfliteModel` quantises and dequantises); a spatial
output (n, h, w, k) is average-pooled to (n, k). Each sample's embedding is computed once per
backbone and kept beside the sample store, under ``embeddings/<backbone sha256>/``, so a new
backbone never sees a stale embedding and a round trains the head over cached features.

With augmentation on, every round embeds freshly augmented images instead (the cache holds
the un-augmented embedding only): slower, by one backbone invoke per sample per round.

Personalisation (FedPer-style, off unless the agent is configured with a
:class:`PersonalPolicy`): after each release the agent fine-tunes a copy of the release's
head on its own samples (the training side of its held-out split), serves that, and keeps
the release's head to compare the two on the held-out side (:meth:`TransferTasks.personalise`).
Rounds still train from the release's head, so what the fleet learns is unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.augment import Augmenter
from agent.config import AgentConfig
from agent.evaluation import evaluate_model, held_out
from agent.head import HeadTrainer
from agent.model import ServingModel
from agent.preprocess import decode_image, prepare_input
from agent.runtime import TensorInfo, TfliteModel
from agent.store import SampleStore, StoredSample
from agent.training import TrainConfig
from protocol.errors import FedgeError, ModelError
from protocol.messages.agent import Personalisation
from protocol.messages.evaluation import Evaluation
from protocol.messages.rounds import BlobRef, ModelRelease, RoundConfig
from protocol.preprocess import PreprocessSpec

__all__ = [
    "Backbone",
    "PersonalPolicy",
    "ServedTransferModel",
    "TransferTasks",
    "personal_policy",
    "sample_input",
]

logger = logging.getLogger(__name__)

_EMBED_BATCH = 32
Fetch = Callable[[BlobRef], bytes]


@dataclass(frozen=True, slots=True)
class PersonalPolicy:
    """How an agent fine-tunes its own head after each release."""

    epochs: int = 20
    learning_rate: float = 0.1
    eval_fraction: float = 0.2


def personal_policy(config: AgentConfig) -> PersonalPolicy | None:
    """The agent's personalisation settings; None (the default) turns it off."""
    if config.personalise_epochs is None:
        return None
    return PersonalPolicy(
        epochs=config.personalise_epochs,
        learning_rate=config.personalise_learning_rate,
        eval_fraction=config.personalise_eval_fraction,
    )


def sample_input(
    store: SampleStore,
    sample: StoredSample,
    spec: PreprocessSpec,
    augmenter: Augmenter | None = None,
) -> np.ndarray | None:
    """A stored sample as a model input (augmented first when asked); None if unusable."""
    try:
        image = decode_image(store.load_image(sample))
    except FedgeError as exc:
        logger.warning("sample %s unusable: %s", sample.sample_id, exc)
        return None
    if augmenter is not None:
        image = augmenter.augment(image)
    return prepare_input(image, spec)


class Backbone:
    """A frozen feature extractor: images (n, h, w, c) -> features (n, k).

    Every output counts: each (n, k) as it is, each (n, h, w, k) average-pooled, joined in
    output order (a third-party model often has several, e.g. a landmark model's coordinates
    and scores); the release's serving model joins them the same way.
    """

    def __init__(self, content: bytes) -> None:
        self.model = TfliteModel.from_bytes(content)
        shape = self.model.input_details.shape
        outputs = self.model.output_details
        if len(shape) != 4 or not outputs or any(len(o.shape) not in (2, 4) for o in outputs):
            raise ModelError(
                f"not a feature extractor: input {shape}, outputs {[o.shape for o in outputs]}",
                reason="bad_backbone",
            )
        self.input_shape = tuple(int(d) for d in shape[1:])
        self.feature_size = sum(int(o.shape[-1]) for o in outputs)

    def embed(self, images: np.ndarray) -> np.ndarray:
        parts = []
        for begin in range(0, len(images), _EMBED_BATCH):
            outs = self.model.predict(images[begin : begin + _EMBED_BATCH])
            pooled = [out.mean(axis=(1, 2)) if out.ndim == 4 else out for out in outs]
            parts.append(np.concatenate(pooled, axis=1))
        return np.concatenate(parts).astype(np.float32)


class ServedTransferModel:
    """Backbone then head, behind the interface the agent's pipeline serves through."""

    def __init__(self, backbone: Backbone, head: HeadTrainer, classes: int) -> None:
        self._backbone = backbone
        self._head = head
        self._lock = threading.Lock()
        self.runtime = backbone.model.runtime
        self.input_details = backbone.model.input_details
        self.output_details = (TensorInfo("output", (1, classes), "float32", 0.0, 0),)

    def predict(self, batch: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(batch, np.float32)
        if x.ndim == 3:
            x = x[np.newaxis]
        with self._lock:
            return [self._head.predict(self._backbone.embed(x))]


class TransferTasks:
    """Embeddings, head trainers and serving models for transfer releases."""

    def __init__(
        self,
        *,
        store: SampleStore,
        data_dir: Path,
        fetch: Fetch,
        personal: PersonalPolicy | None = None,
    ) -> None:
        self._store = store
        self._root = data_dir / "embeddings"
        self._fetch = fetch
        self._backbones: dict[str, Backbone] = {}
        self.personal = personal  # None: no personalisation (the default)
        self.personalisation: Personalisation | None = None

    def backbone(self, release: ModelRelease) -> Backbone:
        sha = release.trainable.sha256
        if sha not in self._backbones:
            self._backbones.clear()  # one backbone at a time: the newest release's
            backbone = Backbone(self._fetch(release.trainable))
            spec = release.preprocess
            if backbone.input_shape != (spec.height, spec.width, spec.channels):
                raise ModelError(
                    f"release {release.version}: its preprocessing does not feed the backbone "
                    f"{backbone.input_shape}",
                    reason="spec_mismatch",
                )
            self._backbones[sha] = backbone
        return self._backbones[sha]

    def trainer(self, release: ModelRelease, weights: list[np.ndarray]) -> HeadTrainer:
        head = HeadTrainer(weights)
        backbone = self.backbone(release)
        if head.input_shape != (backbone.feature_size,) or head.num_classes != len(release.labels):
            raise ModelError(
                f"release {release.version}: a head of {head.input_shape[0]} features and "
                f"{head.num_classes} classes does not fit a backbone of "
                f"{backbone.feature_size} features and {len(release.labels)} labels",
                reason="bad_weights",
            )
        return head

    def serving(self, release: ModelRelease, weights: list[np.ndarray]) -> ServingModel:
        model = ServedTransferModel(
            self.backbone(release), self.trainer(release, weights), len(weights[-1])
        )
        return ServingModel(
            model=model,  # type: ignore[arg-type]
            spec=release.preprocess,
            version=release.version,
            labels=release.labels,
            classifier=True,
        )

    def round_data(
        self, release: ModelRelease, head: HeadTrainer, config: RoundConfig
    ) -> tuple[np.ndarray, np.ndarray, Evaluation | None]:
        """The round's training embeddings and labels, and the evaluation of ``head``.

        The held-out split (``config.eval_fraction``) is evaluated un-augmented and left out
        of training; with augmentation the training part is embedded afresh.
        """
        x, y, ids = self.dataset(release)
        held = held_out(ids, config.eval_fraction)
        evaluation = evaluate_model(
            head, x[held], y[held], classes=len(release.labels), version=release.version
        )
        if config.augment:
            x, y, ids = self.dataset(release, augment_seed=config.seed)
            held = held_out(ids, config.eval_fraction)
        return x[~held], y[~held], evaluation

    def dataset(
        self, release: ModelRelease, *, augment_seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Embeddings, label indexes and sample ids of the task's samples, in a stable order."""
        index = {label: i for i, label in enumerate(release.labels)}
        backbone = self.backbone(release)
        samples = [s for s in self._store.samples() if s.label in index]
        samples.sort(key=lambda s: s.sample_id)
        cache = self._root / release.trainable.sha256
        cache.mkdir(parents=True, exist_ok=True)
        augmenter = Augmenter(seed=augment_seed) if augment_seed is not None else None
        features: dict[str, np.ndarray] = {}
        missing: list[StoredSample] = []
        for sample in samples:
            cached = cache / f"{sample.sample_id}.npy"
            if augmenter is None and cached.is_file():
                try:
                    features[sample.sample_id] = np.load(cached, allow_pickle=False)
                    continue
                except (OSError, ValueError):
                    logger.warning("embedding of %s unreadable; computing it again", sample)
            missing.append(sample)
        for sample, embedding in self._embed(missing, release, backbone, augmenter):
            features[sample.sample_id] = embedding
            if augmenter is None:
                temporary = cache / f"{sample.sample_id}.tmp.npy"
                np.save(temporary, embedding, allow_pickle=False)
                temporary.replace(cache / f"{sample.sample_id}.npy")
        kept = [s for s in samples if s.sample_id in features]
        if not kept:
            empty = np.zeros((0, backbone.feature_size), np.float32)
            return empty, np.zeros((0,), np.int32), []
        x = np.stack([features[s.sample_id] for s in kept]).astype(np.float32)
        y = np.asarray([index[s.label] for s in kept], np.int32)
        return x, y, [s.sample_id for s in kept]

    def _embed(
        self,
        samples: list[StoredSample],
        release: ModelRelease,
        backbone: Backbone,
        augmenter: Augmenter | None,
    ) -> Iterable[tuple[StoredSample, np.ndarray]]:
        for begin in range(0, len(samples), _EMBED_BATCH):
            batch, images = [], []
            for sample in samples[begin : begin + _EMBED_BATCH]:
                image = sample_input(self._store, sample, release.preprocess, augmenter)
                if image is not None:
                    batch.append(sample)
                    images.append(image)
            if images:
                yield from zip(batch, backbone.embed(np.stack(images)), strict=True)

    def personalise(
        self, release: ModelRelease, weights: list[np.ndarray]
    ) -> tuple[list[np.ndarray], Personalisation]:
        """A head fine-tuned from ``weights`` on this agent's samples, and both accuracies.

        Without training samples the release's head is kept (``serving="global"``). The
        report is kept as :attr:`personalisation` for the agent's status.
        """
        policy = self.personal
        assert policy is not None, "personalise() needs a PersonalPolicy"
        x, y, ids = self.dataset(release)
        held = held_out(ids, policy.eval_fraction)
        fleet = self.trainer(release, weights)
        personal = self.trainer(release, weights)
        trained_on = int((~held).sum())
        if trained_on:
            config = TrainConfig(
                epochs=policy.epochs,
                batch_size=release.train_batch_size,
                learning_rate=policy.learning_rate,
            )
            personal.train(x[~held], y[~held], config)
        report = Personalisation(
            model_version=release.version,
            held_out=int(held.sum()),
            trained_on=trained_on,
            global_accuracy=fleet.evaluate(x[held], y[held])[1] if held.any() else None,
            personal_accuracy=personal.evaluate(x[held], y[held])[1] if held.any() else None,
            serving="personal" if trained_on else "global",
        )
        self.personalisation = report
        return personal.get_weights(), report
