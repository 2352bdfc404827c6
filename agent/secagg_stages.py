"""The agent's secure-aggregation stages over MQTT, around :class:`agent.secagg.SecAggClient`.

The coordinator's stage messages (directory, inbox, unmask request) are signed; each is
handled once per (round, stage) however often QoS 1 delivers it, on the network thread (a
few milliseconds of X25519, HKDF and AES). The agent's answers go through the outbox. The
worker that trains waits for the inbox (bounded by the round's deadline plus one stage)
before it masks its update.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from agent.secagg import SecAggClient
from protocol.errors import FedgeError
from protocol.messages.base import Message
from protocol.messages.codec import encode_message
from protocol.messages.rounds import RoundAnnouncement
from protocol.messages.secagg import KeyDirectory, ShareInbox, UnmaskRequest
from protocol.topics import Topics, topic_matches

__all__ = ["AgentSecAgg"]

logger = logging.getLogger(__name__)

SESSIONS_KEPT = 2


class AgentSecAgg:
    def __init__(
        self,
        *,
        agent_id: str,
        topics: Topics,
        publish: Callable[[str, bytes], None],
        verified: Callable[[str, bytes, type[Message]], Message | None],
        report_error: Callable[[str, str], None],
    ) -> None:
        self.agent_id = agent_id
        self.topics = topics
        self._publish = publish
        self._verified = verified
        self._report_error = report_error
        self._lock = threading.Lock()
        self._sessions: dict[int, SecAggClient] = {}
        self._inbox_ready: dict[int, threading.Event] = {}
        self._seen: set[tuple[int, str]] = set()
        self.filters = (topics.all_secagg_broadcasts(), topics.all_secagg_inboxes(agent_id))

    def handles(self, topic: str) -> bool:
        return any(topic_matches(f, topic) for f in self.filters)

    def begin(self, announcement: RoundAnnouncement) -> None:
        """New keys for the round, advertised at once (before training, which takes longer)."""
        params = announcement.config.secure_aggregation
        assert params is not None
        number = announcement.round
        client = SecAggClient(agent=self.agent_id, round_number=number, params=params)
        with self._lock:
            self._sessions[number] = client
            self._inbox_ready[number] = threading.Event()
            for old in sorted(self._sessions)[:-SESSIONS_KEPT]:
                self._sessions.pop(old, None)
                self._inbox_ready.pop(old, None)
        self._send(number, "keys", client.advertise())

    def masked(self, number: int, values: np.ndarray, until: float) -> np.ndarray:
        """The masked upload, once the inbox arrived; FedgeError if it did not by ``until``."""
        with self._lock:
            ready = self._inbox_ready.get(number)
            client = self._sessions.get(number)
        if ready is None or client is None:
            raise FedgeError(
                f"round {number}: no secure aggregation session", reason="secagg_order"
            )
        if not ready.wait(max(0.0, until - time.time())):
            raise FedgeError(
                f"round {number}: no share inbox by the deadline (dropped at the share stage)",
                reason="secagg_late",
            )
        return client.masked(values)

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = self.topics.parse(topic)
            number = parsed.round or 0
            with self._lock:
                client = self._sessions.get(number)
            if client is None:
                return  # not a round this agent takes part in
            kinds: dict[str, type[Message]] = {"directory": KeyDirectory, "unmask": UnmaskRequest}
            kind = kinds.get(parsed.stage or "", ShareInbox)
            message = self._verified(topic, payload, kind)
            if message is None or not self._first(number, type(message).__name__):
                return  # refused (the verifier reported it), or a QoS 1 duplicate
            if isinstance(message, KeyDirectory):
                self._send(number, "shares", client.on_directory(message))
            elif isinstance(message, UnmaskRequest):
                self._send(number, "revealed", client.on_unmask(message))
            elif isinstance(message, ShareInbox):
                client.on_inbox(message)
                with self._lock:
                    ready = self._inbox_ready.get(number)
                if ready is not None:
                    ready.set()
        except FedgeError as exc:
            self._report_error(exc.reason, f"secure aggregation on {topic}: {exc}")

    def _first(self, number: int, stage: str) -> bool:
        with self._lock:
            if (number, stage) in self._seen:
                return False
            self._seen.add((number, stage))
            return True

    def _send(self, number: int, stage: str, message: Message) -> None:
        self._publish(
            self.topics.secagg_from_agent(number, self.agent_id, stage), encode_message(message)
        )
        logger.info("round %d: secure aggregation %s sent", number, stage)
