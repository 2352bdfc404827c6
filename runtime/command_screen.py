"""Operator signatures checked before a daemon reads a command; off without operator keys.

Agent and coordinator alike put every payload from their command topic through
:meth:`CommandScreen.admit` first. With ``operator_keys`` configured, only a fresh command
signed for that topic passes (:mod:`protocol.operator`); anything else is answered with an
error event naming the reason and, where its command id can be read, a refusing
``command_ack`` (what ``fedge round``, ``fedge agent send`` and the dashboard wait for).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from protocol.errors import FedgeError
from protocol.messages.codec import encode_message
from protocol.operator import load_command_gate, refusal
from runtime.settings import FedgeSettings

__all__ = ["CommandScreen"]

Refuse = Callable[[str, str], None]  # (reason, message): the daemon's error event
Answer = Callable[[bytes], None]  # a refusing command_ack, for the daemon's events topic


class CommandScreen:
    def __init__(self, settings: FedgeSettings, *, refuse: Refuse, answer: Answer) -> None:
        self._gate = load_command_gate(
            settings.operator_keys, window_s=settings.operator_command_window_s
        )
        self._refuse = refuse
        self._answer = answer

    @property
    def active(self) -> bool:
        return self._gate is not None

    def admit(self, topic: str, payload: bytes) -> bytes | None:
        """The command's own JSON if it may be obeyed, else ``None`` (it was answered)."""
        if self._gate is None:
            return payload
        try:
            return self._gate.open(topic, payload, time.time())
        except FedgeError as exc:
            refused = refusal(payload, exc)
            named = f" {refused.command_id}" if refused is not None else ""
            self._refuse(exc.reason, f"command{named} on {topic} refused: {exc}")
            if refused is not None:  # the sender waits for an answer to its command id
                self._answer(encode_message(refused))
            return None
