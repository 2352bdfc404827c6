"""How a round closes: each update accepted or refused, then aggregated, evaluated, released.

A mixin of :class:`coordinator.rounds.RoundRunner`, kept apart because closing is most of a
round's logic; it uses the runner's fleet, state, producer and privacy ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from coordinator.federated_eval import federated_metrics, record_evaluation
from coordinator.fleet import AgentInfo, Fleet, ReceivedUpdate
from coordinator.private_rounds import RoundPrivacy
from coordinator.pruning import prune_after_round, unpacked, with_masks
from coordinator.round_plan import ModelProducer, RoundOutcome, RoundPlan
from coordinator.state import CoordinatorState, StoredUpdate
from coordinator.strategies import ClientUpdate, Strategy, make_strategy
from coordinator.validation import DEFAULT_MAX_RELATIVE_NORM, validate_update
from coordinator.variants import note_ranges
from protocol.chunks import CHUNK_HEADER_BYTES
from protocol.errors import FedgeError, ProtocolError
from protocol.messages.agent import ErrorEvent
from protocol.messages.rounds import (
    ModelMetrics,
    ModelRelease,
    PrivacySpent,
    RoundAnnouncement,
    UpdateComplete,
)
from protocol.tensors import decode_tensors, encode_tensors
from protocol.updates import decode_update

__all__ = ["RoundClosing"]

logger = logging.getLogger("coordinator.rounds")


class RoundClosing:
    """The closing half of a round; :class:`~coordinator.rounds.RoundRunner` mixes it in."""

    fleet: Fleet
    state: CoordinatorState
    producer: ModelProducer
    privacy: RoundPrivacy
    _sum_result: tuple[list[np.ndarray], dict[str, Any], int, PrivacySpent | None] | None
    # When the round's steps happened (and the agents' own timings), for its metrics.
    _timings: dict[str, Any]

    def _accept(
        self,
        update: ReceivedUpdate,
        announcement: RoundAnnouncement,
        base: list[np.ndarray],
        plan: RoundPlan,
    ) -> None:
        complete = update.complete
        agent = complete.agent
        accepted_at = self.fleet.now()
        try:
            if complete.round != announcement.round:
                raise ProtocolError(
                    f"update for round {complete.round}, current round is {announcement.round}",
                    reason="stale_round",
                )
            if agent not in announcement.selected:
                raise ProtocolError(
                    f"agent {agent} was not selected for round {announcement.round}",
                    reason="not_selected",
                )
            if complete.base_model_version != announcement.release.version:
                raise ProtocolError(
                    f"update trained from {complete.base_model_version}, "
                    f"round uses {announcement.release.version}",
                    reason="wrong_base",
                )
            deltas = unpacked(self.state, announcement.release, decode_update(update.payload))
            if len(deltas) != len(base):
                raise ProtocolError(
                    f"update has {len(deltas)} tensors, the model has {len(base)}",
                    reason="wrong_count",
                )
            for index, (delta, reference) in enumerate(zip(deltas, base, strict=True)):
                if delta.shape != reference.shape:
                    raise ProtocolError(
                        f"tensor {index} has shape {delta.shape}, the model's is {reference.shape}",
                        reason="wrong_shape",
                    )
            weights = [b + d for b, d in zip(base, deltas, strict=True)]
            # An operator's absolute bound replaces the default one relative to the model's
            # norm, which a freshly initialised head over raw (uncentred) features outgrows
            # in its first round: its bias moves by the features' mean times its kernel's.
            relative = None if plan.max_update_norm is not None else DEFAULT_MAX_RELATIVE_NORM
            validate_update(
                weights,
                reference=base,
                max_norm=plan.max_update_norm,
                max_relative_norm=relative,
            )
        except FedgeError as exc:
            logger.warning("update from %s refused: %s", agent, exc)
            self.fleet.reject(
                ErrorEvent(
                    reason=exc.reason,
                    message=f"update from {agent} refused: {exc}",
                    timestamp=self.fleet.now(),
                ),
                agent=agent,
            )
            return
        stored = self.state.add_update(
            StoredUpdate(
                round=complete.round,
                agent=agent,
                num_examples=complete.num_examples,
                encoding=complete.encoding.value,
                payload=update.payload,
                loss=complete.loss,
                accuracy=complete.accuracy,
            )
        )
        if stored:
            record_evaluation(self.state, complete)
            note_ranges(self.state, complete)
            self._note_timings(complete, accepted_at)
        if not stored:
            logger.info("duplicate update from %s for round %d ignored", agent, complete.round)
        elif plan.privacy is not None and plan.privacy.adaptive:
            self.privacy.note(complete)

    def _note_timings(self, complete: UpdateComplete, accepted_at: float) -> None:
        timings = self._timings.setdefault("agents", {})
        entry = (
            complete.timings.model_dump(exclude={"kind", "schema_version"})
            if complete.timings
            else {}
        )
        timings[complete.agent] = {**entry, "accepted_at": accepted_at}
        self._timings["validate_s"] = self._timings.get("validate_s", 0.0) + (
            self.fleet.now() - accepted_at
        )

    def _aggregate(
        self,
        announcement: RoundAnnouncement,
        plan: RoundPlan,
        base: list[np.ndarray],
        bytes_up: int,
    ) -> RoundOutcome:
        number = announcement.round
        strategy = self._strategy(plan)
        saved = self._strategy_state_before(number)
        if saved is not None:
            strategy.load_state_dict(_decode_state(saved, self.state))
        aggregation = strategy.begin(base)
        total_examples = 0
        agents = sorted(self.state.update_agents(number))
        privacy_metrics: dict[str, Any] = {}
        spent: PrivacySpent | None = None
        stored_updates = (self.state.update(number, agent) for agent in agents)
        if self._sum_result is not None:
            # Secure aggregation: the strategy gets the unmasked mean, as it would with DP.
            weights, privacy_metrics, total_examples, spent = self._sum_result
            self._sum_result = None
            aggregation.add(ClientUpdate(agent="secagg-mean", weights=weights, num_examples=1))
        elif plan.privacy is not None:
            counted = [0]

            def payloads() -> Iterator[tuple[str, bytes]]:
                for stored in stored_updates:
                    assert stored is not None
                    counted[0] += stored.num_examples
                    yield stored.agent, stored.payload

            noisy, privacy_metrics, spent = self.privacy.aggregate(
                number, base, payloads(), plan.privacy
            )
            total_examples = counted[0]
            # The strategy sees one update, the noisy mean: FedAvg keeps it, a server
            # optimiser steps along it.
            aggregation.add(ClientUpdate(agent="dp-mean", weights=noisy, num_examples=1))
        else:
            for stored in stored_updates:
                assert stored is not None
                deltas = unpacked(self.state, announcement.release, decode_update(stored.payload))
                weights = [b + d for b, d in zip(base, deltas, strict=True)]
                aggregation.add(
                    ClientUpdate(
                        agent=stored.agent, weights=weights, num_examples=stored.num_examples
                    )
                )
                total_examples += stored.num_examples
        new_weights, masks = prune_after_round(
            self.state, plan.pruning, number, aggregation.result()
        )
        self.state.put(
            f"strategy_state_r{number}", _encode_state(strategy.state_dict(), self.state)
        )
        timings = {**self._timings, "aggregated_at": self.fleet.now()}
        self._timings = {}
        metrics_model = self.producer.evaluate(new_weights)
        timings["evaluated_at"] = self.fleet.now()
        version = f"r{number}"
        release = self._publish(
            version=version,
            round_number=number,
            weights=new_weights,
            metrics=metrics_model,
            privacy=spent,
            masks=masks,
        )
        timings["released_at"] = self.fleet.now()
        record = self.state.round(number)
        started = record.started_at if record else self.fleet.now()
        metrics = {
            "accuracy": metrics_model.accuracy,
            "loss": metrics_model.loss,
            "updates": len(agents),
            "selected": len(announcement.selected),
            "examples": total_examples,
            "bytes_up": bytes_up,
            "bytes_down_per_agent": _download_bytes(announcement.release.weights),
            "version": release.version,
            "seconds": max(0.0, self.fleet.now() - started),
            **privacy_metrics,
            **federated_metrics(self.state, number, agents),
            "timings": timings,
        }
        self.state.finish_round(number, state="done", reason=None, metrics=metrics)
        logger.info(
            "round %d done: accuracy %s from %d updates",
            number,
            metrics_model.accuracy,
            len(agents),
        )
        return RoundOutcome(number, ok=True, version=version, reason=None, metrics=metrics)

    def _publish(
        self,
        *,
        version: str,
        round_number: int,
        weights: Sequence[np.ndarray],
        metrics: ModelMetrics | None,
        privacy: PrivacySpent | None = None,
        masks: bytes | None = None,
    ) -> ModelRelease:
        release, blobs = self.producer.release(
            version=version, round_number=round_number, weights=weights, metrics=metrics
        )
        release, blobs = with_masks(release, blobs, masks)
        if privacy is not None:
            release = release.model_copy(update={"privacy": privacy})
        for sha256, data in blobs.items():
            self.state.put_blob(sha256, data)
        self.state.put_release(version, round_number, release.model_dump_json())
        self.fleet.publish_release(release, blobs)
        self.state.put("current_version", version)
        return release

    def _strategy_state_before(self, number: int) -> dict[str, Any] | None:
        """The server optimiser's state after the newest successful round before ``number``."""
        for earlier in range(number - 1, 0, -1):
            saved = self.state.get(f"strategy_state_r{earlier}")
            if saved is not None:
                return dict(saved)
        return None

    def _strategy(self, plan: RoundPlan) -> Strategy:
        return make_strategy(plan.strategy, **plan.strategy_options)


def _download_bytes(ref: Any) -> int:
    """What fetching one blob costs on the wire: its bytes plus a header per chunk."""
    return int(ref.size_bytes + ref.chunk_count * CHUNK_HEADER_BYTES)


def _can_train(agent: AgentInfo) -> bool:
    return agent.online and agent.can_train


def _refs(release: ModelRelease) -> list[Any]:
    refs = [release.weights, release.trainable, release.inference, release.inference_int8]
    refs.append(release.prune_mask)
    refs.append(release.keras_model)
    refs += [variant.blob for variant in release.variants]
    return [ref for ref in refs if ref is not None]


def _encode_state(state: dict[str, Any], store: CoordinatorState) -> dict[str, Any]:
    """Strategy state as JSON; arrays go to the blob table, referenced by hash."""
    import hashlib

    encoded: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            data = encode_tensors({f"s{i}": a for i, a in enumerate(value)})
            digest = hashlib.sha256(data).hexdigest()
            store.put_blob(digest, data)
            encoded[key] = {"arrays": digest}
        else:
            encoded[key] = value
    return encoded


def _decode_state(encoded: dict[str, Any], store: CoordinatorState) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, value in encoded.items():
        if isinstance(value, dict) and "arrays" in value:
            tensors = decode_tensors(store.blob(value["arrays"]))
            state[key] = [tensors[f"s{i}"] for i in range(len(tensors))]
        else:
            state[key] = value
    return state
