"""Secure aggregation's stages over a fleet, each bounded by its own deadline.

keys (``stage_deadline_s`` from the announcement) -> directory; shares (one stage deadline)
-> inboxes; masked uploads (until the round's deadline, at least one stage deadline) ->
unmask request; revealed shares (one stage deadline) -> the sum. A stage closes early once
everyone expected has answered; the agents that did not answer by its deadline are the ones
that dropped. Fewer than ``threshold`` at any stage fails the round with a reason naming the
stage: no wait is unbounded. A restarted coordinator cannot resume such a round (the
relay's state is in memory, and the agents' keys were per round): it fails it and goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from coordinator.dp import MEAN_STRATEGIES
from coordinator.fleet import Fleet, ReceivedUpdate
from coordinator.secagg import SecAggServer
from coordinator.state import CoordinatorState, StoredUpdate
from protocol.errors import ConfigError, FedgeError, ProtocolError
from protocol.messages.agent import ErrorEvent
from protocol.messages.codec import decode_message
from protocol.messages.rounds import RoundAnnouncement, UpdateEncoding
from protocol.messages.secagg import AgentKeys, EncryptedShares, SecAggParams, UnmaskShares

__all__ = ["SecAggResult", "check_secure_plan", "run_secure_stages", "secagg_from_options"]

logger = logging.getLogger(__name__)

POLL_S = 0.05
_KINDS: dict[str, type[AgentKeys | EncryptedShares | UnmaskShares]] = {
    "keys": AgentKeys,
    "shares": EncryptedShares,
    "revealed": UnmaskShares,
}
Progress = Callable[[str, int], None]


@dataclass(frozen=True, slots=True)
class SecAggResult:
    mean: list[np.ndarray]  # the mean update, tensor by tensor
    count: int
    examples: int
    bytes_up: int
    dropped: dict[str, int]  # stage -> agents that dropped at it
    # Key, share and unmask traffic on top of the masked uploads, summed over the agents.
    stage_bytes_up: int = 0
    stage_bytes_down: int = 0


class _Stages:
    def __init__(
        self,
        *,
        fleet: Fleet,
        state: CoordinatorState,
        announcement: RoundAnnouncement,
        shapes: list[tuple[int, ...]],
        progress: Progress,
    ) -> None:
        params = announcement.config.secure_aggregation
        assert params is not None
        self.params: SecAggParams = params
        self.fleet = fleet
        self.state = state
        self.announcement = announcement
        self.number = announcement.round
        self.shapes = shapes
        self.length = int(sum(int(np.prod(s)) for s in shapes))
        self.server = SecAggServer(
            round_number=self.number,
            params=params,
            selected=announcement.selected,
            length=self.length,
        )
        self.examples = 0
        self.bytes_up = 0
        self.stage_bytes_up = 0
        self.stage_bytes_down = 0
        self.progress = progress

    def run(self) -> SecAggResult:
        server, params, fleet = self.server, self.params, self.fleet
        selected = set(self.announcement.selected)
        stage_s = params.stage_deadline_s
        self._collect(
            "keys", lambda: selected <= set(server.keys), self.announcement.issued_at + stage_s
        )
        directory = server.directory()
        self.progress("shares", 0)
        # A broadcast reaches every selected agent (they all subscribe to the round's stages).
        receivers = len(selected)
        self.stage_bytes_down += receivers * fleet.publish_secagg(
            self.number, "directory", directory
        )
        advertised = set(server.keys)
        self._collect("shares", lambda: advertised <= set(server.sharers), fleet.now() + stage_s)
        inboxes = server.inboxes()
        self.progress("upload", 0)
        for agent, inbox in inboxes.items():
            self.stage_bytes_down += fleet.publish_secagg(self.number, "inbox", inbox, agent=agent)
        sharers = set(server.sharers)
        upload_until = max(self.announcement.deadline_at, fleet.now() + stage_s)
        self._collect("upload", lambda: sharers <= server.uploaded, upload_until)
        request = server.unmask_request()
        self.progress("unmask", len(server.uploaded))
        self.stage_bytes_down += receivers * fleet.publish_secagg(self.number, "unmask", request)
        self._collect(
            "unmask", lambda: not server.missing() and self._all_revealed(), fleet.now() + stage_s
        )
        total, count = server.result()
        mean, offset = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            mean.append((total[offset : offset + size] / count).reshape(shape))
            offset += size
        dropped = {
            "keys": len(selected - advertised),
            "shares": len(advertised - sharers),
            "upload": len(request.dropped),
            "unmask": len(set(request.survivors) - server.revealed_by),
        }
        return SecAggResult(
            mean,
            count,
            self.examples,
            self.bytes_up,
            dropped,
            stage_bytes_up=self.stage_bytes_up,
            stage_bytes_down=self.stage_bytes_down,
        )

    def _all_revealed(self) -> bool:
        return set(self.server.unmask_request().survivors) <= self.server.revealed_by

    def _collect(self, stage: str, done: Callable[[], bool], deadline: float) -> None:
        while not done() and self.fleet.now() < deadline:
            self.progress(stage, len(self.server.uploaded))
            message = self.fleet.next_secagg(POLL_S)
            if message is not None and message.round == self.number:
                self._on_message(message.stage, message.agent, message.payload)
            update = self.fleet.next_update(self.number, 0.0)
            if update is not None:
                self._on_upload(update)

    def _on_message(self, stage: str, agent: str, payload: bytes) -> None:
        self.stage_bytes_up += len(payload)
        try:
            message = decode_message(payload, _KINDS[stage])
            if not isinstance(message, AgentKeys | EncryptedShares | UnmaskShares):
                raise ProtocolError("not a stage message", reason="secagg_bad_message")
            claimed = message.keys.agent if isinstance(message, AgentKeys) else message.agent
            if claimed != agent:
                raise ProtocolError(f"{agent} sent a message for {claimed}", reason="wrong_agent")
            if isinstance(message, AgentKeys):
                self.server.add_keys(message)
            elif isinstance(message, EncryptedShares):
                self.server.add_shares(message)
            else:
                self.server.add_revealed(message)
        except (FedgeError, ValidationError, KeyError) as exc:
            self._refuse(agent, getattr(exc, "reason", "secagg_bad_message"), f"{stage}: {exc}")

    def _on_upload(self, update: ReceivedUpdate) -> None:
        complete = update.complete
        agent = complete.agent
        try:
            if complete.round != self.number:
                raise ProtocolError(f"update for round {complete.round}", reason="stale_round")
            if complete.encoding is not UpdateEncoding.MASKED_U32:
                raise ProtocolError(
                    "this round uses secure aggregation: only masked uploads count",
                    reason="secagg_unmasked",
                )
            if complete.base_model_version != self.announcement.release.version:
                raise ProtocolError("update trained from another model", reason="wrong_base")
            if len(update.payload) != 4 * self.length:
                raise ProtocolError(
                    f"masked upload of {len(update.payload)} bytes, expected {4 * self.length}",
                    reason="wrong_shape",
                )
            vector = np.frombuffer(update.payload, dtype="<u4").astype(np.uint32)
            if not self.server.add_masked(agent, vector):
                return
        except FedgeError as exc:
            self._refuse(agent, exc.reason, f"masked upload: {exc}")
            return
        self.examples += complete.num_examples
        self.bytes_up += update.bytes_received
        self.state.add_update(
            StoredUpdate(
                round=self.number,
                agent=agent,
                num_examples=complete.num_examples,
                encoding=complete.encoding.value,
                payload=update.payload,
                loss=complete.loss,
                accuracy=complete.accuracy,
            )
        )

    def _refuse(self, agent: str, reason: str, message: str) -> None:
        logger.warning("secure aggregation, round %d, %s refused: %s", self.number, agent, message)
        self.fleet.reject(
            ErrorEvent(
                reason=reason, message=f"{agent}: {message}"[:1024], timestamp=self.fleet.now()
            ),
            agent=agent,
        )


def run_secure_stages(
    *,
    fleet: Fleet,
    state: CoordinatorState,
    announcement: RoundAnnouncement,
    shapes: list[tuple[int, ...]],
    progress: Progress,
) -> SecAggResult:
    """Run every stage of one round; raises ``SecAggFailedError`` with the reason."""
    stages = _Stages(
        fleet=fleet,
        state=state,
        announcement=announcement,
        shapes=shapes,
        progress=progress,
    )
    return stages.run()


def check_secure_plan(
    strategy: str, strategy_options: dict[str, object], max_update_norm: float | None
) -> None:
    """Refuse, naming why, what needs individual updates: secure aggregation hides them."""
    if strategy not in MEAN_STRATEGIES:
        raise ConfigError(
            f"secure aggregation gives the coordinator only the sum of the updates; "
            f"{strategy!r} needs every update on its own. Use one of: "
            f"{', '.join(MEAN_STRATEGIES)}",
            reason="secagg_strategy",
        )
    if "clip_norm" in strategy_options or max_update_norm is not None:
        raise ConfigError(
            "secure aggregation hides individual updates, so the coordinator cannot clip or "
            "validate them one by one (clip_norm, max_update_norm); bound them with "
            "secagg_clip_range instead",
            reason="secagg_validation",
        )


_OPTION_FIELDS = {
    "secagg_threshold": "threshold",
    "secagg_degree": "degree",
    "secagg_clip_range": "clip_range",
    "secagg_quantisation_levels": "quantisation_levels",
    "secagg_stage_deadline_s": "stage_deadline_s",
}


def secagg_from_options(options: dict[str, object]) -> SecAggParams | None:
    """The ``secure_aggregation`` and ``secagg_*`` options of a start command."""
    if not options.get("secure_aggregation"):
        if any(key.startswith("secagg_") for key in options):
            raise ConfigError("secagg_* options need secure_aggregation=true", reason="bad_options")
        return None
    unknown = sorted(k for k in options if k.startswith("secagg_") and k not in _OPTION_FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(_OPTION_FIELDS)}",
            reason="unknown_option",
        )
    fields = {_OPTION_FIELDS[k]: v for k, v in options.items() if k in _OPTION_FIELDS}
    for name in ("threshold", "degree", "quantisation_levels"):
        if name in fields:
            fields[name] = int(fields[name])  # type: ignore[call-overload]
    for name in ("clip_range", "stage_deadline_s"):
        if name in fields:
            fields[name] = float(fields[name])  # type: ignore[arg-type]
    fields.setdefault("threshold", 2)
    fields.setdefault("degree", 2 * int(fields["threshold"]))  # type: ignore[call-overload]
    try:
        return SecAggParams.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid secure aggregation options: {exc}", reason="bad_options"
        ) from exc
