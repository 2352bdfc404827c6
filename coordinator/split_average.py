"""SplitFed's federation step: the agents' own parts averaged at the end of a round.

In split learning every agent trains its own copy of the layers it keeps (the lower part,
and the top part when U-shaped) while the coordinator's part is shared. After its batches
each agent sends its part on ``split/<round>/<agent>/<batches>/lower/...`` (the step level
says how many batches it trained); once every expected agent's part is in, the parts are
averaged, weighted by batches trained (the federated average of
:class:`~coordinator.strategies.aggregate.WeightedMean`, which also refuses a second part from
one agent and parts of the wrong shapes), and every agent gets the average on
``split/<round + 1>/<agent>/0/start/...`` to start its next round from.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection

import numpy as np

from coordinator.split_model import FloatArray
from coordinator.strategies.aggregate import WeightedMean, cast_like
from coordinator.strategies.base import ClientUpdate
from protocol.errors import FedgeError
from protocol.split import BatchId, SplitReceiver, split_messages
from protocol.topics import TopicKind, Topics
from runtime.mqtt import MqttLink

__all__ = ["PartAverager"]

_log = logging.getLogger(__name__)


class PartAverager:
    """Collects one round's agent parts, averages them, sends the average to every agent."""

    def __init__(
        self, link: MqttLink, topics: Topics, *, round_number: int, agents: Collection[str]
    ) -> None:
        self._link, self._topics, self._round = link, topics, round_number
        self._expected = frozenset(agents)
        self._parts: dict[str, tuple[int, dict[str, FloatArray]]] = {}
        self._receiver = SplitReceiver()
        self._lock = threading.Lock()
        self.averaged: dict[str, FloatArray] | None = None
        self.done = threading.Event()

    def subscriptions(self) -> list[str]:
        return [self._topics.all_split_lowers()]

    def on_message(self, topic: str, payload: bytes) -> None:
        """The link's handler; parts of other rounds, other agents or other kinds are ignored."""
        try:
            parsed = self._topics.parse(topic)
            if parsed.direction != "lower" or parsed.round != self._round:
                return
            if parsed.agent not in self._expected or parsed.step is None:
                return
            batch = BatchId(self._round, parsed.agent, parsed.step)
            with self._lock:
                if parsed.kind is TopicKind.SPLIT_MANIFEST:
                    whole = self._receiver.add_manifest(batch, "lower", payload)
                else:
                    whole = self._receiver.add_chunk(batch, "lower", payload)
                if whole is None or parsed.agent in self._parts or self.done.is_set():
                    return  # not whole yet, or a resend of a part already in
                self._parts[parsed.agent] = (max(1, parsed.step), whole[2])
                if set(self._parts) == self._expected:
                    self._average()
        except FedgeError as exc:
            _log.warning("refused an agent's part on %s: %s", topic, exc)

    def _average(self) -> None:
        names = sorted(next(iter(self._parts.values()))[1])
        reference = [next(iter(self._parts.values()))[1][name] for name in names]
        mean = WeightedMean(reference, finish=lambda means: cast_like(reference, means))
        for agent, (batches, tensors) in sorted(self._parts.items()):
            if sorted(tensors) != names:
                raise FedgeError(f"agent {agent}'s part names other tensors", reason="bad_part")
            weights = [tensors[name] for name in names]
            mean.add(ClientUpdate(agent=agent, weights=weights, num_examples=batches))
        self.averaged = {
            name: np.asarray(value, dtype=np.float32)
            for name, value in zip(names, mean.result(), strict=True)
        }
        for agent in sorted(self._expected):
            start = BatchId(self._round + 1, agent, 0)
            for topic, payload in split_messages(self._topics, start, "start", self.averaged):
                self._link.publish(topic, payload)
        _log.info("round %d: %d agents' parts averaged", self._round, len(self._parts))
        self.done.set()
