"""The coordinator's side of split learning (SplitFed v2): one shared upper part, in turn.

SplitFed v2, not v1: v1 keeps a server copy per agent and averages the copies, so its server
part differs from the unsplit model's after every round; v2 trains one shared upper part on
the agents' batches one after another, which is exactly the unsplit model's SGD on those
batches in that order (the acceptance compares them), and costs one copy of the upper part
instead of one per agent. Agents still run their lower parts in parallel; only the short
upper step is taken in turn.

Each batch's upper step is computed when the agent's activations are whole, *staged*, and
applied only when the agent says ``done`` (:class:`~protocol.split.SplitLedger`); an agent
that goes silent for ``stage_timeout_s`` (or is declared gone with :meth:`drop`) has its
staged step thrown away, so the upper part is never half updated. Other agents' batches
wait in a queue meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.split_model import FloatArray, UpperPart
from protocol.errors import FedgeError
from protocol.split import BatchId, Decision, SplitLedger, SplitReceiver, split_messages
from protocol.topics import TopicKind, Topics
from runtime.mqtt import MqttLink

__all__ = ["SplitCoordinator", "SplitTraffic"]

_log = logging.getLogger(__name__)

STAGE_TIMEOUT_S = 30.0
_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class _Reply:
    messages: list[tuple[str, bytes]]
    weights: list[FloatArray]
    loss: float


@dataclass
class SplitTraffic:
    """Payload bytes per batch and direction, and every upload payload (tests read them)."""

    up: dict[BatchId, int] = field(default_factory=dict)
    down: dict[BatchId, int] = field(default_factory=dict)
    uploads: list[tuple[str, bytes]] = field(default_factory=list)
    losses: dict[BatchId, float] = field(default_factory=dict)


class SplitCoordinator:
    """Serves the upper part to agents over MQTT; call :meth:`start`, then :meth:`stop`."""

    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        upper: UpperPart,
        *,
        stage_timeout_s: float = STAGE_TIMEOUT_S,
        on_staged: Callable[[BatchId], None] | None = None,
    ) -> None:
        self._link, self._topics, self.upper = link, topics, upper
        self._timeout_s = stage_timeout_s
        self._on_staged = on_staged
        self._ledger: SplitLedger[_Reply] = SplitLedger()
        self._receiver = SplitReceiver()
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._waiting: deque[tuple[BatchId, dict[str, FloatArray]]] = deque()
        self._deadline = 0.0
        self.traffic = SplitTraffic()
        self.events: queue.Queue[tuple[str, BatchId]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="split", daemon=True)

    def subscriptions(self) -> list[str]:
        return [self._topics.all_split_uploads(), self._topics.all_split_done()]

    def on_message(self, topic: str, payload: bytes) -> None:
        """The link's handler: quick, the work happens on the split thread."""
        self._inbox.put((topic, payload))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    @property
    def applied(self) -> int:
        """Batches whose upper step was committed."""
        return self._ledger.applied

    def drop(self, agent: str) -> None:
        """``agent`` is gone: throw its staged step away."""
        self._inbox.put(("drop", agent.encode()))

    def _run(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=_POLL_S)
            except queue.Empty:
                item = ("", b"")
            if item is None:
                return
            try:
                self._handle(*item)
            except FedgeError as exc:
                _log.warning("refused split message on %s: %s", item[0], exc)
            staged = self._ledger.staged
            if staged is not None and time.monotonic() > self._deadline:
                self._abort(staged.agent)

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == "drop":
            self._abort(payload.decode())
            return
        if not topic:
            return
        parsed = self._topics.parse(topic)
        if parsed.round is None or parsed.agent is None or parsed.step is None:
            return
        batch = BatchId(parsed.round, parsed.agent, parsed.step)
        if parsed.kind is TopicKind.SPLIT_DONE:
            self._commit(batch)
            return
        if parsed.direction != "up":
            return
        self.traffic.up[batch] = self.traffic.up.get(batch, 0) + len(payload)
        self.traffic.uploads.append((topic, payload))
        if parsed.kind is TopicKind.SPLIT_MANIFEST:
            done = self._receiver.add_manifest(batch, "up", payload)
        else:
            done = self._receiver.add_chunk(batch, "up", payload)
        if done is not None:
            self._offer(batch, done[2])

    def _offer(self, batch: BatchId, tensors: dict[str, FloatArray]) -> None:
        decision = self._ledger.decide(batch)
        if decision is Decision.RESEND:
            reply = self._ledger.reply_for(batch)
            if reply is not None:
                self._publish(reply.messages)
        elif decision is Decision.WAIT:
            self._waiting.append((batch, tensors))
        else:
            self._apply(batch, tensors)

    def _apply(self, batch: BatchId, tensors: dict[str, FloatArray]) -> None:
        acts, labels = tensors.get("activations"), tensors.get("y")
        if acts is None or labels is None or len(acts) != len(labels):
            _log.warning("split batch %s lacks activations or labels of one length", batch)
            return
        grad, weights, loss = self.upper.step(acts, labels)
        messages = split_messages(self._topics, batch, "down", {"grad": grad})
        self._ledger.stage(batch, _Reply(messages, weights, loss))
        self._deadline = time.monotonic() + self._timeout_s
        self.traffic.down[batch] = sum(len(p) for _t, p in messages)
        self.traffic.losses[batch] = loss
        self.events.put(("staged", batch))
        if self._on_staged is not None:
            self._on_staged(batch)
        self._publish(messages)

    def _commit(self, batch: BatchId) -> None:
        reply = self._ledger.reply_for(batch)
        if reply is None or not self._ledger.commit(batch):
            return
        self.upper.apply(reply.weights)
        self.events.put(("committed", batch))
        self._next()

    def _abort(self, agent: str) -> None:
        batch = self._ledger.abort(agent)
        if batch is None:
            return
        _log.warning("split batch %s aborted: the agent went away mid-batch", batch)
        self.events.put(("aborted", batch))
        self._next()

    def _next(self) -> None:
        while self._waiting and self._ledger.staged is None:
            self._offer(*self._waiting.popleft())

    def _publish(self, messages: list[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            self._link.publish(topic, payload)
