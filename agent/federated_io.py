"""The federated client's dealings outside a round: its data, release blobs, hot swaps.

A mixin of :class:`agent.federated.FederatedClient`: the samples a task trains on, fetching
a release's content-addressed blobs (resumable, with what it waits for in the status), and
swapping the agent's serving model to a new release.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.augment import Augmenter
from agent.evaluation import evaluate_model, held_out
from agent.model import ServingModel
from agent.serving import release_serving_model
from agent.store import SampleStore
from agent.training import Trainer, make_trainer
from agent.transfer_task import TransferTasks, sample_input
from agent.variant_choice import VariantPolicy, choose_variant
from protocol.chunks import BlobManifest
from protocol.errors import FedgeError, ModelError
from protocol.messages.agent import Personalisation
from protocol.messages.evaluation import Evaluation
from protocol.messages.rounds import (
    BlobRef,
    ModelRelease,
    RoundAnnouncement,
    RoundConfig,
)
from protocol.messages.variants import VariantChoice
from protocol.topics import Topics
from protocol.updates import decode_weights
from runtime.mqtt import MqttLink
from runtime.transfer import BlobFetcher

__all__ = [
    "BLOB_TIMEOUT_S",
    "FETCH_STALL_S",
    "FederatedIO",
    "SwapCallback",
    "TrainableServingModel",
]

BLOB_TIMEOUT_S = 120.0
FETCH_STALL_S = 10.0  # no new chunk for this long: say so in the status (the owner resends)
SwapCallback = Callable[[ServingModel], None]

logger = logging.getLogger("agent.federated")
ROUNDS_REMEMBERED = 64
# Prepared samples kept between rounds up to this size (digits: kilobytes; a camera-sized
# model's store may not fit, and is prepared again each round).
MAX_CACHED_DATASET_BYTES = 64 * 2**20


class TrainableServingModel:
    """Serves a fleet release through the trainable model's ``infer`` signature."""

    def __init__(self, trainer: Trainer, runtime: object) -> None:
        from agent.runtime import TensorInfo

        self._trainer = trainer
        self._lock = threading.Lock()
        self.runtime = runtime
        shape = trainer.input_shape
        self.input_details = TensorInfo("x", (1, *shape), "float32", 0.0, 0)
        self.output_details = (TensorInfo("output", (1, trainer.num_classes), "float32", 0.0, 0),)

    def load(self, weights: list[np.ndarray]) -> None:
        """New weights; a frame still running on this model finishes first (the lock)."""
        with self._lock:
            self._trainer.set_weights(weights)

    def predict(self, batch: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(batch, np.float32)
        if x.ndim == len(self.input_details.shape) - 1:
            x = x[np.newaxis]
        with self._lock:
            return [np.asarray(self._trainer.predict(x), np.float32)]


class FederatedIO:
    """Data, blobs and swaps for :class:`~agent.federated.FederatedClient`, which mixes it in."""

    # The variant served now, why, and what was measured of each (for the agent's status).
    variant_choice: VariantChoice | None = None

    if TYPE_CHECKING:  # what the FederatedClient that mixes this in provides

        def _resend(self, number: int) -> None: ...

        topics: Topics
        waiting_for: str | None
        stalled_blob: str | None
        _link: MqttLink
        _store: SampleStore
        _dir: Path
        _blob_dir: Path
        _fetchers: dict[str, BlobFetcher]
        _fetch_lock: threading.Lock
        _on_swap: SwapCallback | None
        _on_waiting: Callable[[], None] | None
        _transfer: TransferTasks
        _serving_round: int
        _state_path: Path
        _done: set[int]
        # The last prepared (unaugmented) dataset and its key; the serving models by turn.
        _dataset_cache: tuple[object, tuple[np.ndarray, np.ndarray, list[str]]] | None
        _serving_models: tuple[object, list[TrainableServingModel]] | None
        _report_error: Callable[[str, str], None]
        variant: VariantPolicy

    def dataset(
        self, release: ModelRelease, *, augment_seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The store's samples as model inputs and label indexes, in a stable order.

        With ``augment_seed``, every image goes through the (seeded) training augmentation
        before the release's preprocessing, so each round sees different variations.
        """
        augmenter = Augmenter(seed=augment_seed) if augment_seed is not None else None
        x, y, _ids = self._inputs(release, augmenter)
        return x, y

    def round_data(
        self, release: ModelRelease, trainer: Trainer, config: RoundConfig
    ) -> tuple[np.ndarray, np.ndarray, Evaluation | None]:
        """The round's training samples, and ``trainer``'s model evaluated on the held-out ones.

        ``config.eval_fraction`` of the samples (by a hash of their ids, so the same ones
        every round) are never trained on; they are evaluated un-augmented, before training,
        so the coordinator learns how the round's starting model does on data it never saw.
        """
        x, y, ids = self._inputs(release, None)
        held = held_out(ids, config.eval_fraction)
        evaluation = evaluate_model(
            trainer, x[held], y[held], classes=len(release.labels), version=release.version
        )
        if config.augment:
            x, y, ids = self._inputs(release, Augmenter(seed=config.seed))
            held = held_out(ids, config.eval_fraction)
        return x[~held], y[~held], evaluation

    def _inputs(
        self, release: ModelRelease, augmenter: Augmenter | None
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Prepared once per store content and release format: decoding every sample again
        each round was the largest part of an agent's round (unaugmented only)."""
        samples = sorted(self._store.samples(), key=lambda s: s.sample_id)
        key = (
            tuple(s.sample_id for s in samples),
            tuple(release.labels),
            release.preprocess.model_dump_json(),
        )
        cached = self._dataset_cache
        if augmenter is None and cached is not None and cached[0] == key:
            return cached[1]
        prepared = self._prepare(release, samples, augmenter)
        if augmenter is None and prepared[0].nbytes <= MAX_CACHED_DATASET_BYTES:
            self._dataset_cache = (key, prepared)
        return prepared

    def _prepare(
        self, release: ModelRelease, samples: list[Any], augmenter: Augmenter | None
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        index = {label: i for i, label in enumerate(release.labels)}
        inputs, targets, ids = [], [], []
        for sample in samples:
            if sample.label not in index:
                continue
            image = sample_input(self._store, sample, release.preprocess, augmenter)
            if image is not None:
                inputs.append(image)
                targets.append(index[sample.label])
                ids.append(sample.sample_id)
        if not inputs:
            return np.zeros((0,), np.float32), np.zeros((0,), np.int32), []
        return np.stack(inputs).astype(np.float32), np.asarray(targets, np.int32), ids

    def other_labels(self, release: ModelRelease) -> dict[str, int]:
        """Samples held whose labels the task does not name: counted, never trained on."""
        wanted = set(release.labels)
        counts: dict[str, int] = {}
        for sample in self._store.samples():
            if sample.label not in wanted:
                counts[sample.label] = counts.get(sample.label, 0) + 1
        return dict(sorted(counts.items()))

    # blobs
    def fetch(self, ref: BlobRef, timeout_s: float = BLOB_TIMEOUT_S) -> bytes:
        """A blob by hash: from the local cache, else from its retained chunks (resumable)."""
        cached = self._blob_dir / ref.sha256
        if cached.is_file():
            data = cached.read_bytes()
            if len(data) == ref.size_bytes:
                return data
        manifest = BlobManifest(
            sha256=ref.sha256,
            size_bytes=ref.size_bytes,
            chunk_bytes=ref.chunk_bytes,
            chunk_count=ref.chunk_count,
            content_type=ref.content_type,
        )
        fetcher = BlobFetcher(
            self._link,
            manifest,
            chunk_topic=lambda i: self.topics.blob_chunk(ref.sha256, i),
            spool_root=self._dir / "spool",
        )
        with self._fetch_lock:
            self._fetchers[ref.sha256] = fetcher
        self._waiting(
            f"the {ref.chunk_count} retained chunks of blob {ref.sha256[:12]} "
            f"({ref.size_bytes} bytes)"
        )
        try:
            fetcher.start()
            data = self._wait_for(fetcher, ref, timeout_s)
        finally:
            fetcher.stop()
            with self._fetch_lock:
                self._fetchers.pop(ref.sha256, None)
            self.stalled_blob = None
            self._waiting(None)
        temporary = cached.with_suffix(".tmp")
        temporary.write_bytes(data)
        temporary.replace(cached)
        fetcher.discard_spool()
        return data

    def _wait_for(self, fetcher: BlobFetcher, ref: BlobRef, timeout_s: float) -> bytes:
        """The blob; a fetch that stalls is announced in the status until chunks come again."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = fetcher.chunks_new
            slice_s = min(FETCH_STALL_S, max(0.0, deadline - time.monotonic()))
            try:
                return fetcher.wait(slice_s)
            except FedgeError as exc:
                if exc.reason != "timeout" or time.monotonic() >= deadline:
                    raise
            stalled = fetcher.chunks_new == seen
            if stalled != (self.stalled_blob is not None):
                self.stalled_blob = ref.sha256 if stalled else None
                state = "stalled, asking the coordinator to resend" if stalled else "resumed"
                self._waiting(f"the retained chunks of blob {ref.sha256[:12]} ({state})")

    def _waiting(self, what: str | None) -> None:
        self.waiting_for = what
        if what is not None:
            logger.info("waiting for %s", what)
        if self._on_waiting is not None:
            self._on_waiting()

    # hot swap
    @property
    def personalisation(self) -> Personalisation | None:
        """The personal head served since the last release, with both accuracies, if any."""
        return self._transfer.personalisation

    def _maybe_swap(self, release: ModelRelease) -> None:
        if self._on_swap is None or release.round <= self._serving_round:
            return
        if release.recipe == "transfer":
            served: ServingModel | None
            if self._transfer.personal is not None:  # FedPer-style: a head tuned on our data
                weights = decode_weights(self.fetch(release.weights))
                mine, report = self._transfer.personalise(release, weights)
                served, how = self._transfer.serving(release, mine), f"{report.serving} head"
            else:
                served = release_serving_model(release, self.fetch)
                how = "one .tflite"
            if served is None:  # a release of before serving variants: backbone, then head
                weights = decode_weights(self.fetch(release.weights))
                served, how = self._transfer.serving(release, weights), "backbone, then head"
            self._serving_round = release.round
            self._on_swap(served)
            logger.info("now serving fleet model %s (%s)", release.version, how)
            return
        if release.recipe == "keras" and release.variants:  # no trainable .tflite to serve
            served = release_serving_model(release, self.fetch)
            if served is not None:
                self._serving_round = release.round
                self._on_swap(served)
                logger.info("now serving fleet model %s (float32 variant)", release.version)
                return
        if release.variants:
            picked = choose_variant(
                release,
                fetch=self.fetch,
                samples=self.dataset(release),
                policy=self.variant.policy,
                within_points=self.variant.within_points,
                report_error=self._report_error,
            )
            self.variant_choice = picked.choice
            self._serving_round = release.round
            self._on_swap(
                ServingModel(
                    model=picked.model,
                    spec=release.preprocess,
                    version=release.version,
                    labels=release.labels,
                    classifier=True,
                )
            )
            return
        model = self._idle_serving_model(release)
        model.load(decode_weights(self.fetch(release.weights)))
        expected = (
            release.preprocess.height,
            release.preprocess.width,
            release.preprocess.channels,
        )
        if tuple(model.input_details.shape[1:]) != expected:
            raise ModelError(
                f"release {release.version} spec does not fit its model", reason="spec_mismatch"
            )
        serving = ServingModel(
            model=model,  # type: ignore[arg-type]
            spec=release.preprocess,
            version=release.version,
            labels=release.labels,
            classifier=True,
        )
        self._serving_round = release.round
        self._on_swap(serving)
        logger.info("now serving fleet model %s", release.version)

    def _idle_serving_model(self, release: ModelRelease) -> TrainableServingModel:
        """A serving model of the release's architecture that is not the one serving now.

        Two are kept and used in turn, so a swap loads weights into the idle one instead
        of building an interpreter every round.
        """
        key = (release.trainable.sha256, release.model_name, release.train_batch_size)
        if self._serving_models is None or self._serving_models[0] != key:
            self._serving_models = (key, [])
        models = self._serving_models[1]
        if len(models) < 2:
            from agent.runtime import load_interpreter_class

            trainer = make_trainer(
                "litert",
                trainable_tflite=self.fetch(release.trainable),
                model_name=release.model_name,
                batch_size=release.train_batch_size,
            )
            models.append(TrainableServingModel(trainer, load_interpreter_class()))
            return models[-1]
        models.reverse()  # the one that served before the current one
        return models[-1]

    # round bookkeeping
    def _announced_again(self, announcement: RoundAnnouncement) -> None:
        """A restarted coordinator may have lost what it received but had not stored: send the
        kept update again (stored once per round and agent) until the deadline's extension."""
        extended = announcement.deadline_at + (announcement.deadline_at - announcement.issued_at)
        if time.time() <= extended:
            self._resend(announcement.round)

    def _load_done(self) -> set[int]:
        try:
            return set(json.loads(self._state_path.read_text()).get("rounds_done", []))
        except (OSError, ValueError):
            return set()

    def _mark_done(self, number: int) -> None:
        self._done.add(number)
        kept = sorted(self._done)[-ROUNDS_REMEMBERED:]
        self._done = set(kept)
        temporary = self._state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"rounds_done": kept}))
        temporary.replace(self._state_path)
