"""The agent's side of federated rounds: a small state machine driven by retained messages.

1. The coordinator's signed round announcement (retained) arrives; an unsigned, tampered
   or foreign-signed one is refused with an error event.
2. If this agent is selected and has not done the round yet, it fetches the release's
   blobs (resumably, cached by hash), trains on its sample store, and sends the change it
   made as chunks plus a completion message through the outbox, so a dropped link or a
   restart loses nothing. Rounds done are remembered on disk: a repeated announcement
   changes nothing.
3. Every newer signed release (retained on the models' manifest topics) is hot-swapped into
   inference through the trainable model's ``infer`` signature.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from agent.federated_io import FederatedIO, SwapCallback, TrainableServingModel
from agent.privacy import LocalDp
from agent.round_change import round_change
from agent.secagg_stages import AgentSecAgg
from agent.store import SampleStore
from agent.training import TrainConfig, Trainer, fitting_trainer, make_trainer
from agent.transfer_task import PersonalPolicy, TransferTasks
from agent.variant_choice import VariantPolicy
from protocol.chunks import CHUNK_HEADER_BYTES, DEFAULT_MAX_CHUNK_BYTES, split_blob
from protocol.errors import FedgeError, ModelError
from protocol.masks import decode_masks
from protocol.messages.base import Message
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.rounds import (
    ModelRelease,
    RoundAnnouncement,
    UpdateComplete,
    UpdateEncoding,
    UpdateTimings,
)
from protocol.messages.variants import ActivationRanges
from protocol.signing import SignedMessage, VerifyKey
from protocol.tensors import Encoding
from protocol.topics import TopicKind, Topics, topic_matches
from protocol.updates import decode_weights, encode_update
from runtime.calibration import measure_activation_ranges
from runtime.mqtt import MqttLink
from runtime.transfer import BlobFetcher

__all__ = ["FederatedClient", "TrainableServingModel"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Publish = Callable[[str, bytes], None]
ErrorReporter = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class _Job:
    announcement: RoundAnnouncement | None = None
    release: ModelRelease | None = None
    received_at: float = 0.0


class FederatedClient(FederatedIO):
    def __init__(
        self,
        *,
        agent_id: str,
        topics: Topics,
        link: MqttLink,
        publish_reliably: Publish,
        report_error: ErrorReporter,
        store: SampleStore,
        data_dir: Path,
        verify_key: VerifyKey,
        trainer_kind: str,
        fallback_trainer: str | None = None,
        on_swap: SwapCallback | None = None,
        on_waiting: Callable[[], None] | None = None,
        local_dp: LocalDp | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        variant: VariantPolicy | None = None,
        personal: PersonalPolicy | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.topics = topics
        self._link = link
        self._publish = publish_reliably
        self._report_error = report_error
        self._store = store
        self._dir = data_dir
        self._blob_dir = data_dir / "blobs"
        self._blob_dir.mkdir(parents=True, exist_ok=True)
        self._key = verify_key
        self._trainer_kind = trainer_kind
        self._fallback_trainer = fallback_trainer
        self._on_swap = on_swap
        self._on_waiting = on_waiting
        # For the status: what this client waits for (e.g. retained chunks a broker lost).
        self.waiting_for: str | None = None
        self.stalled_blob: str | None = None
        self._local_dp = local_dp
        self._max_chunk_bytes = max_chunk_bytes
        self.variant = variant or VariantPolicy()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._fetchers: dict[str, BlobFetcher] = {}
        self._fetch_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_path = data_dir / "federated.json"
        self._updates_dir = data_dir / "updates"
        self._done = self._load_done()
        self._serving_round = -1
        self._dataset_cache = None
        self._serving_models = None
        self._manifest_filter = topics.all_model_manifests()
        self._blob_filter = topics.all_blob_chunks()
        self.bytes_down = 0
        self.bytes_up = 0
        self.last_report: dict[str, float | int | None] = {}
        self._trainer: Trainer | None = None
        self._trainer_key: tuple[str, str, int, str] | None = None
        self._transfer = TransferTasks(store=store, data_dir=data_dir, fetch=self.fetch)
        self._transfer.personal = personal
        self._secagg = AgentSecAgg(
            agent_id=agent_id,
            topics=topics,
            publish=publish_reliably,
            verified=self._verified,
            report_error=report_error,
        )

    # lifecycle
    def start(self) -> None:
        self._link.subscribe(self.topics.round_current(), qos=1)
        for topic_filter in self._secagg.filters:
            self._link.subscribe(topic_filter, qos=1)
        if self._on_swap is not None:
            self._link.subscribe(self._manifest_filter, qos=1)
        self._thread = threading.Thread(target=self._work, name="agent-federated", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._jobs.put(_Job())
        if self._thread is not None:
            self._thread.join(10.0)

    # routing (network thread: quick)
    def handles(self, topic: str) -> bool:
        return (
            self._secagg.handles(topic)
            or topic == self.topics.round_current()
            or topic_matches(self._manifest_filter, topic)
            or topic_matches(self._blob_filter, topic)
        )

    def on_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        if self._secagg.handles(topic):
            self._secagg.on_message(topic, payload)
            return
        try:
            parsed = self.topics.parse(topic)
        except FedgeError:
            return
        if parsed.kind is TopicKind.BLOB_CHUNK:
            with self._fetch_lock:
                fetcher = self._fetchers.get(parsed.version or "")
            if fetcher is not None:
                self.bytes_down += len(payload)
                fetcher.on_message(topic, payload)
            return
        if parsed.kind is TopicKind.ROUND_CURRENT:
            announcement = self._verified(topic, payload, RoundAnnouncement)
            if announcement is not None:
                self._jobs.put(_Job(announcement=announcement, received_at=time.time()))
        elif parsed.kind is TopicKind.MODEL_MANIFEST:
            release = self._verified(topic, payload, ModelRelease)
            if release is not None:
                self._jobs.put(_Job(release=release))

    def _verified(self, topic: str, payload: bytes, kind: type[M]) -> M | None:
        try:
            signed = decode_message(payload, SignedMessage)
            return decode_message(self._key.verify(signed), kind)
        except FedgeError as exc:
            self._report_error(exc.reason, f"refused {topic}: {exc}")
            return None

    # the worker
    def _work(self) -> None:
        while not self._stopping.is_set():
            for job in self._newest_jobs():
                self._run_job(job)

    def _newest_jobs(self) -> list[_Job]:
        """The next job and those queued behind it, less the superseded: only the newest
        release and announcement count (a restarted or slow agent finds several queued, and
        an old round's blobs may no longer be retained)."""
        jobs = [self._jobs.get()]
        while not self._jobs.empty():
            jobs.append(self._jobs.get_nowait())
        if self._stopping.is_set():
            return []
        releases = [j for j in jobs if j.release is not None]
        newest = sorted(releases, key=lambda j: j.release.round if j.release else -1)[-1:]
        return newest + [j for j in jobs if j.announcement is not None][-1:]

    def _run_job(self, job: _Job) -> None:
        try:
            if job.announcement is not None:
                self._on_announcement(job.announcement, job.received_at)
            elif job.release is not None:
                self._maybe_swap(job.release)
        except FedgeError as exc:
            self._report_error(exc.reason, f"federated round step failed: {exc}")
        except Exception as exc:
            logger.exception("federated step failed")
            self._report_error("internal", f"federated round step failed: {exc}")

    def _on_announcement(self, announcement: RoundAnnouncement, received_at: float = 0.0) -> None:
        taken_at = time.time()
        self._maybe_swap(announcement.release)
        number = announcement.round
        if self.agent_id not in announcement.selected:
            return
        if number in self._done:
            self._announced_again(announcement)
            return
        if time.time() > announcement.deadline_at:
            logger.info("round %d: deadline already passed, not training", number)
            return
        release = announcement.release
        secure = announcement.config.secure_aggregation
        if secure is not None:
            self._secagg.begin(announcement)
        weights = decode_weights(self.fetch(release.weights))
        config = announcement.config
        trainer: Trainer
        if release.recipe == "transfer":
            head = self._transfer.trainer(release, weights)
            x, y, evaluation = self._transfer.round_data(release, head, config)
            trainer = head
        else:
            trainer = self._trainer_for(release)
            trainer.set_weights(weights)
            x, y, evaluation = self.round_data(release, trainer, config)
        others = self.other_labels(release)
        if len(x) < config.min_samples:
            held = f"; samples of other labels, not used: {others}" if others else ""
            raise FedgeError(
                f"round {number}: sitting out, {len(x)} samples of the task's labels "
                f"(the round needs {config.min_samples}){held}",
                reason="no_samples" if len(x) == 0 else "too_few_samples",
            )
        ready_at = time.time()
        report = trainer.train(
            x,
            y,
            TrainConfig(
                epochs=config.epochs,
                batch_size=release.train_batch_size,
                learning_rate=config.learning_rate,
                proximal_mu=config.proximal_mu,
                seed=config.seed,
                validation_fraction=config.validation_fraction,
            ),
        )
        trained_at = time.time()
        deltas, clipped = round_change(
            trainer.get_weights(),
            weights,
            masks=decode_masks(self.fetch(release.prune_mask)) if release.prune_mask else None,
            config=config,
            local_dp=self._local_dp,
            plain=secure is None,
        )
        encoding = config.update_encoding
        if secure is not None:
            # The plain update is kept only on this device (below); the masked one travels.
            self._keep_plain(number, deltas)
            flat = np.concatenate([np.ravel(d) for d in deltas])
            until = announcement.deadline_at + secure.stage_deadline_s
            blob = self._secagg.masked(number, flat, until).astype("<u4").tobytes()
            encoding = UpdateEncoding.MASKED_U32
        else:
            blob = encode_update(deltas, encoding=Encoding(config.update_encoding.value))
        manifest, chunks = split_blob(blob, max_chunk_bytes=self._max_chunk_bytes)
        complete = UpdateComplete(
            round=number,
            agent=self.agent_id,
            base_model_version=release.version,
            update_sha256=manifest.sha256,
            update_size_bytes=manifest.size_bytes,
            chunk_count=manifest.chunk_count,
            chunk_bytes=manifest.chunk_bytes,
            encoding=encoding,
            num_examples=report.num_examples,
            loss=report.loss if np.isfinite(report.loss) else None,
            accuracy=report.val_accuracy,
            train_seconds=report.seconds,
            evaluation=evaluation,
            # Under secure aggregation whether the update was clipped is a bit about it alone.
            clipped=None if secure is not None else clipped,
            activation_ranges=self._ranges(release, x),
            timings=UpdateTimings(
                received_at=received_at or taken_at,
                started_at=taken_at,
                ready_at=ready_at,
                trained_at=trained_at,
                sent_at=time.time(),
            ),
        )
        self._keep_update(number, blob, complete)
        self._send_update(number, chunks, complete)
        self._mark_done(number)
        self.last_report = {
            "round": number,
            "examples": report.num_examples,
            "loss": report.loss,
            "seconds": time.time() - taken_at,
            "other_labels": sum(others.values()),
        }
        logger.info(
            "round %d: trained on %d samples, update of %d bytes sent",
            number,
            report.num_examples,
            len(blob),
        )

    def _ranges(self, release: ModelRelease, x: np.ndarray) -> ActivationRanges | None:
        """The float serving model's activation ranges on our samples, for int8 calibration."""
        if release.inference is None or len(x) == 0:
            return None
        try:
            return measure_activation_ranges(self.fetch(release.inference), x)
        except (ModelError, ImportError) as exc:
            logger.warning("no activation ranges for %s: %s", release.version, exc)
            return None

    def _trainer_for(self, release: ModelRelease) -> Trainer:
        """One trainer per architecture: building (and for Keras, tracing) it is the slow part."""
        kind = fitting_trainer(release, self._trainer_kind, self._fallback_trainer)
        key = (release.trainable.sha256, release.model_name, release.train_batch_size, kind)
        if self._trainer_key != key or self._trainer is None:
            keras_model = release.keras_model if kind == "keras" else None
            self._trainer = make_trainer(
                kind,
                trainable_tflite=self.fetch(release.trainable) if kind == "litert" else None,
                model_name=release.model_name,
                batch_size=release.train_batch_size,
                keras_model=self.fetch(keras_model) if keras_model is not None else None,
            )
            self._trainer_key = key
        return self._trainer

    # updates: sent through the outbox, kept on disk for a re-announced round
    def _send_update(self, number: int, chunks: list[bytes], complete: UpdateComplete) -> None:
        for index, chunk in enumerate(chunks):
            self._publish(self.topics.update_chunk(number, self.agent_id, index), chunk)
        self._publish(self.topics.update_manifest(number, self.agent_id), encode_message(complete))
        self.bytes_up += sum(len(chunk) for chunk in chunks)

    def _keep_update(self, number: int, blob: bytes, complete: UpdateComplete) -> None:
        self._updates_dir.mkdir(parents=True, exist_ok=True)
        (self._updates_dir / f"{number}.update").write_bytes(blob)
        (self._updates_dir / f"{number}.json").write_bytes(encode_message(complete))
        for old in sorted(self._updates_dir.glob("*.update"), key=lambda p: int(p.stem))[:-2]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)

    def _keep_plain(self, number: int, deltas: list[np.ndarray]) -> None:
        """This agent's own unmasked update, for its own audit; it never leaves the device."""
        self._updates_dir.mkdir(parents=True, exist_ok=True)
        plain = encode_update(deltas, encoding=Encoding.FLOAT32)
        (self._updates_dir / f"{number}.plain").write_bytes(plain)

    def _resend(self, number: int) -> None:
        try:
            blob = (self._updates_dir / f"{number}.update").read_bytes()
            complete = decode_message(
                (self._updates_dir / f"{number}.json").read_bytes(), UpdateComplete
            )
        except (OSError, FedgeError):
            logger.info("round %d announced again; no kept update to send", number)
            return
        # Cut as the first time (the kept completion names the size): the coordinator may hold some.
        _, chunks = split_blob(blob, max_chunk_bytes=complete.chunk_bytes + CHUNK_HEADER_BYTES)
        self._send_update(number, chunks, complete)
        logger.info("round %d announced again: update sent again", number)
