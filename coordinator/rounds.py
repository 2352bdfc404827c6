"""The round state machine: select, announce, collect, aggregate, evaluate, release.

It talks to the network only through a :class:`~coordinator.fleet.Fleet` and to model
code only through a :class:`ModelProducer`, so the same logic runs against MQTT and in
memory. Every wait is bounded by the round's deadline; a round without quorum at its
deadline is extended once, then failed with a reason that says what was missing.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import numpy as np

from coordinator.distributed_dp import (
    accounted_multiplier,
    check_distributed_plan,
    check_ring,
    round_params,
)
from coordinator.dp import check_strategy
from coordinator.fleet import Fleet
from coordinator.private_rounds import RoundPrivacy
from coordinator.round_closing import (
    RoundClosing,
    _can_train,
    _refs,
)
from coordinator.round_plan import (
    ModelProducer,
    OutcomeCallback,
    ProgressCallback,
    RoundOutcome,
    RoundPlan,
    _dumps,
)
from coordinator.secagg_rounds import check_secure_plan, run_secure_stages
from coordinator.selection import trainer_mismatch
from coordinator.state import CoordinatorState
from protocol.errors import FedgeError
from protocol.messages.rounds import (
    ModelRelease,
    PrivacySpent,
    RoundAnnouncement,
)
from protocol.updates import decode_weights

__all__ = ["ModelProducer", "RoundOutcome", "RoundPlan", "RoundRunner"]

logger = logging.getLogger(__name__)

POLL_S = 0.25


class RoundRunner(RoundClosing):
    """Runs rounds one after another; resumable from its state after a crash."""

    def __init__(
        self,
        *,
        fleet: Fleet,
        state: CoordinatorState,
        producer: ModelProducer,
        on_progress: ProgressCallback | None = None,
        on_outcome: OutcomeCallback | None = None,
    ) -> None:
        self.fleet = fleet
        self.state = state
        self.producer = producer
        self._on_progress = on_progress
        self._on_outcome = on_outcome
        self._stop_requested = False
        self.privacy = RoundPrivacy(state)
        self._sum_result: (
            tuple[list[np.ndarray], dict[str, Any], int, PrivacySpent | None] | None
        ) = None
        self._timings: dict[str, Any] = {}
        self._stop_reason = "a stop was requested"
        # Agents online that the last selection left out, and why.
        self._left_out: dict[str, str] = {}

    # releases
    def current_release(self) -> ModelRelease:
        """The newest release; the first call makes and publishes round 0's."""
        version = self.state.get("current_version")
        if version is not None:
            text = self.state.release_json(version)
            if text is not None:
                return ModelRelease.model_validate_json(text)
        weights = self.producer.initial_weights()
        metrics = self.producer.evaluate(weights)
        return self._publish(version="r0", round_number=0, weights=weights, metrics=metrics)

    def republish_current(self) -> ModelRelease:
        """Publish the current release again (a restarted coordinator, a new broker)."""
        release = self.current_release()
        blobs = {ref.sha256: self.state.blob(ref.sha256) for ref in _refs(release)}
        self.fleet.publish_release(release, blobs)
        return release

    def open_announcement(self) -> RoundAnnouncement | None:
        """The announcement of the round still collecting updates, if one is."""
        last = self.state.round(self.state.last_round_number())
        if last is None or last.state != "announced" or self.state.get("announcement") is None:
            return None
        return RoundAnnouncement.model_validate_json(_dumps(self.state.get("announcement")))

    def weights_of(self, release: ModelRelease) -> list[np.ndarray]:
        return decode_weights(self.state.blob(release.weights.sha256))

    def request_stop(self, why: str | None = None) -> None:
        """Stop after the round that is running (closing it early); ``why`` is recorded."""
        if why:
            self._stop_reason = why
        self._stop_requested = True

    # the plan
    def run_plan(self, plan: RoundPlan) -> list[RoundOutcome]:
        """Run (or resume) ``plan``; returns the outcome of every round run now."""
        if plan.privacy is not None:
            check_strategy(plan.strategy, plan.strategy_options)
        if plan.secure_aggregation is not None:
            check_secure_plan(plan.strategy, plan.strategy_options, plan.max_update_norm)
            if plan.privacy is not None:
                check_distributed_plan(plan.privacy, plan.secure_aggregation)
        self.state.put("plan", plan.to_json())
        done = int(self.state.get("plan_rounds_done") or 0)
        outcomes = []
        while done < plan.rounds and not self._stop_requested:
            refused = self._privacy_refusal(plan)
            if refused is not None:
                outcomes.append(refused)
                if self._on_outcome is not None:
                    self._on_outcome(refused)
                break
            outcome = self.run_round(plan)
            outcomes.append(outcome)
            if self._on_outcome is not None:
                self._on_outcome(outcome)
            done += 1
            self.state.put("plan_rounds_done", done)
        self.state.put("plan", None)
        self.state.put("plan_rounds_done", 0)
        return outcomes

    def _privacy_refusal(self, plan: RoundPlan) -> RoundOutcome | None:
        """A stop before a round the privacy budget cannot pay for (a resumed one was paid)."""
        last = self.state.round(self.state.last_round_number())
        if plan.privacy is None or (last is not None and last.state == "announced"):
            return None
        multiplier = None
        if plan.secure_aggregation is not None:  # agents' noise: charged a little differently
            multiplier = accounted_multiplier(
                plan.privacy,
                plan.secure_aggregation,
                clip_norm=self.privacy.clip_norm(plan.privacy),
                length=sum(w.size for w in self.weights_of(self.current_release())),
            )
        reason = self.privacy.refusal(plan.privacy, multiplier)
        if reason is None:
            return None
        logger.warning("rounds stopped: %s", reason)
        number = self.state.last_round_number() + 1
        return RoundOutcome(
            number, ok=False, version=None, reason=reason, metrics={}, privacy_stop=True
        )

    def pending_plan(self) -> RoundPlan | None:
        data = self.state.get("plan")
        return RoundPlan.from_json(data) if data else None

    # one round
    def run_round(self, plan: RoundPlan) -> RoundOutcome:
        last = self.state.round(self.state.last_round_number())
        if last is not None and last.state == "announced":
            logger.info("resuming round %d", last.round)
            announcement = RoundAnnouncement.model_validate_json(
                _dumps(self.state.get("announcement"))
            )
            if announcement.config.secure_aggregation is not None:
                reason = "the coordinator restarted during secure aggregation: its keys are gone"
                self.state.finish_round(last.round, state="failed", reason=reason, metrics={})
                return RoundOutcome(last.round, ok=False, version=None, reason=reason, metrics={})
            self.fleet.announce(announcement)
            return self._collect_and_close(announcement, plan)
        announcement = self._announce(plan)
        if plan.secure_aggregation is not None:
            return self._secure_round(announcement, plan)
        return self._collect_and_close(announcement, plan)

    def _secure_round(self, announcement: RoundAnnouncement, plan: RoundPlan) -> RoundOutcome:
        number = announcement.round
        base = self.weights_of(announcement.release)
        try:
            result = run_secure_stages(
                fleet=self.fleet,
                state=self.state,
                announcement=announcement,
                shapes=[tuple(b.shape) for b in base],
                progress=lambda stage, received: self._progress(
                    number,
                    announcement,
                    {str(i) for i in range(received)},
                    (announcement.deadline_at, 0),
                    stage=stage,
                ),
            )
        except FedgeError as exc:
            reason = str(exc)
            self.state.finish_round(number, state="failed", reason=reason, metrics={})
            logger.error("round %d failed: %s", number, reason)  # noqa: TRY400 - reason says it
            return RoundOutcome(number, ok=False, version=None, reason=reason, metrics={})
        mean = [np.asarray(b, np.float64) + m for b, m in zip(base, result.mean, strict=True)]
        extra: dict[str, Any] = {
            f"secagg_dropped_{stage}": count for stage, count in result.dropped.items()
        }
        extra["secagg_stage_bytes_up"] = result.stage_bytes_up
        extra["secagg_stage_bytes_down"] = result.stage_bytes_down
        spent = None
        if plan.privacy is not None:  # the agents' noise is in the sum: charge the ledger
            dp_metrics, spent = self.privacy.charge_secure(
                number, plan.privacy, announcement.config, length=sum(b.size for b in base)
            )
            extra.update(dp_metrics)
        self._sum_result = (
            [m.astype(b.dtype) for m, b in zip(mean, base, strict=True)],
            {**extra, "secagg_updates": result.count},
            result.examples,
            spent,
        )
        return self._aggregate(announcement, plan, base, result.bytes_up)

    def _announce(self, plan: RoundPlan) -> RoundAnnouncement:
        release = self.current_release()
        round_number = self.state.last_round_number() + 1
        strategy = self._strategy(plan)
        overrides: dict[str, Any] = dict(strategy.round_config_overrides())
        if plan.privacy is not None:
            overrides["clip_norm"] = self.privacy.clip_norm(plan.privacy)
        if plan.secure_aggregation is not None:
            overrides["secure_aggregation"] = round_params(
                plan.secure_aggregation, plan.privacy, overrides.get("clip_norm")
            )
        config = plan.config.model_copy(
            update={**overrides, "seed": plan.config.seed + round_number}
        )
        selected = self._select(plan, round_number, release)
        if config.secure_aggregation is not None:
            check_ring(len(selected), config.secure_aggregation)
        now = self.fleet.now()
        announcement = RoundAnnouncement(
            round=round_number,
            release=release,
            selected=selected,
            config=config,
            deadline_at=now + plan.deadline_s,
            issued_at=now,
        )
        # The announcement first: a crash before the round row exists just announces anew.
        self.state.put("announcement", announcement.model_dump(mode="json"))
        self.state.start_round(
            round_number,
            base_version=release.version,
            selected=selected,
            config=config.model_dump(mode="json"),
            deadline_at=announcement.deadline_at,
            started_at=now,
        )
        self.fleet.announce(announcement)
        self._timings = {"announced_at": self.fleet.now()}
        logger.info("round %d announced to %d agents", round_number, len(selected))
        for agent, why in self._left_out.items():
            logger.info("round %d: %s left out: %s", round_number, agent, why)
        return announcement

    def _select(self, plan: RoundPlan, round_number: int, release: ModelRelease) -> tuple[str, ...]:
        deadline = self.fleet.now() + plan.deadline_s
        while True:
            online = [a for a in self.fleet.agents().values() if _can_train(a)]
            self._left_out = {
                a.agent: why for a in online if (why := trainer_mismatch(a, release)) is not None
            }
            able = sorted(a.agent for a in online if a.agent not in self._left_out)
            if len(able) >= plan.min_agents:
                break
            if self._stop_requested:
                raise FedgeError(
                    f"round {round_number} not started: {self._stop_reason}", reason="stopped"
                )
            if self.fleet.now() >= deadline:
                unfit = f" ({len(self._left_out)} more lack a fitting trainer)"
                raise FedgeError(
                    f"round {round_number}: only {len(able)} agents online that can train, "
                    f"{plan.min_agents} needed{unfit if self._left_out else ''}",
                    reason="not_enough_agents",
                )
            self.fleet.pause(POLL_S)
        count = max(plan.min_agents, math.ceil(plan.fraction * len(able)))
        chosen = random.Random(round_number).sample(able, min(count, len(able)))  # noqa: S311
        return tuple(sorted(chosen))

    def _collect_and_close(self, announcement: RoundAnnouncement, plan: RoundPlan) -> RoundOutcome:
        number = announcement.round
        record = self.state.round(number)
        assert record is not None
        base = self.weights_of(announcement.release)
        selected = set(announcement.selected)
        deadline = record.deadline_at
        extended = record.deadline_at > announcement.deadline_at
        bytes_up = 0
        while True:
            received = self.state.update_agents(number)
            self._progress(number, announcement, received, (deadline, bytes_up))
            if selected <= received or self._stop_requested:
                break
            remaining = deadline - self.fleet.now()
            if remaining <= 0:
                if len(received) >= plan.min_agents or extended:
                    break
                deadline = self.fleet.now() + plan.deadline_s
                extended = True
                self.state.extend_round(number, deadline)
                logger.warning(
                    "round %d: %d of %d updates at the deadline, %d needed: extended once",
                    number,
                    len(received),
                    len(selected),
                    plan.min_agents,
                )
                continue
            update = self.fleet.next_update(number, min(remaining, POLL_S))
            if update is not None:
                bytes_up += update.bytes_received
                self._accept(update, announcement, base, plan)
        self._timings["collected_at"] = self.fleet.now()
        received = self.state.update_agents(number)
        if len(received) < plan.min_agents and self._stop_requested:
            reason = (
                f"stopped with {len(received)} of {len(selected)} selected agents reported, "
                f"{plan.min_agents} needed: {self._stop_reason}"
            )
            self.state.finish_round(number, state="stopped", reason=reason, metrics={})
            logger.warning("round %d stopped: %s", number, reason)
            return RoundOutcome(
                number, ok=False, version=None, reason=reason, metrics={}, stopped=True
            )
        if len(received) < plan.min_agents:
            reason = (
                f"quorum not reached: {len(received)} of {len(selected)} selected agents "
                f"reported by the extended deadline, {plan.min_agents} needed"
            )
            self.state.finish_round(number, state="failed", reason=reason, metrics={})
            logger.error("round %d failed: %s", number, reason)
            return RoundOutcome(number, ok=False, version=None, reason=reason, metrics={})
        return self._aggregate(announcement, plan, base, bytes_up)

    def _progress(
        self,
        number: int,
        announcement: RoundAnnouncement,
        received: set[str],
        deadline_and_bytes: tuple[float, int],
        stage: str | None = None,
    ) -> None:
        if self._on_progress is None:
            return
        deadline, bytes_up = deadline_and_bytes
        progress: dict[str, Any] = {
            "round": number,
            "selected": len(announcement.selected),
            "received": len(received),
            "seconds_left": max(0.0, deadline - self.fleet.now()),
            "bytes_up": bytes_up,
        }
        if self._left_out:
            progress["left_out"] = dict(self._left_out)
        if stage is not None:
            progress["stage"] = stage  # secure aggregation: reported before the stage opens
        self._on_progress(progress)
