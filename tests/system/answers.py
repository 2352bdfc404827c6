"""Waiting for a daemon's answers on its events topic: acknowledgements by command id."""

from __future__ import annotations

from protocol.errors import FedgeError
from protocol.messages.agent import CommandAck
from protocol.messages.base import Message
from protocol.messages.codec import decode_message
from tests.brokers import MessageCollector, Received

__all__ = ["ANSWER_TIMEOUT_S", "ack_for", "decoded"]

ANSWER_TIMEOUT_S = 30.0


def decoded(messages: list[Received]) -> list[Message]:
    """The fedge messages among ``messages`` (anything else is skipped)."""
    found: list[Message] = []
    for message in messages:
        try:
            found.append(decode_message(message.payload))
        except FedgeError:
            continue
    return found


def ack_for(
    collector: MessageCollector, command_id: str, timeout_s: float = ANSWER_TIMEOUT_S
) -> CommandAck:
    """The first acknowledgement of ``command_id``, once it has come."""

    def acks(messages: list[Received]) -> list[CommandAck]:
        return [
            m for m in decoded(messages) if isinstance(m, CommandAck) and m.command_id == command_id
        ]

    return acks(collector.wait_for(lambda messages: bool(acks(messages)), timeout_s))[0]
