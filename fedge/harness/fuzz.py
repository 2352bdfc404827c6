"""An outside fuzzer: a plain MQTT client throwing hostile payloads at a running fleet.

Payloads are random bytes, and mutations of valid messages (commands, statuses, signed
announcements and releases, chunk headers, update completions): fields dropped, values
swapped for other JSON types, huge numbers, long strings, NUL bytes, truncation, flipped
bytes. They go to every topic an agent or the coordinator reads, QoS 0 and 1 mixed
(commands at QoS 1, so each one is delivered and must be answered).

The property a caller checks with :class:`Answers`: every command got an answer, an ack
(``command_ack`` naming its ``command_id``) or an error event about that command topic.
Tracebacks in the processes' logs are the caller's to check (the suite's fixtures do).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from fedge.harness.clients import Received, publish
from protocol.errors import FedgeError
from protocol.messages.agent import CommandAck, ErrorEvent
from protocol.messages.base import Message
from protocol.messages.codec import decode_message
from protocol.topics import Topics

__all__ = ["Answers", "FuzzTarget", "Fuzzer", "decoded_message", "fleet_targets"]

MAX_RANDOM_BYTES = 2048
_JSON_ODDITIES: tuple[Any, ...] = (
    None,
    True,
    -1,
    0,
    2**63,
    10**400,
    1e308,
    -1e-320,
    "",
    "x" * 5000,
    "a\x00b",
    "../../etc/passwd",
    [],
    {},
    [1, [2, [3]]],
    {"kind": "ping"},
)

Seed = dict[str, Any]


@dataclass(frozen=True, slots=True)
class FuzzTarget:
    """A topic someone reads, valid payloads to mutate, and whether it takes commands."""

    topic: str
    seeds: tuple[Seed, ...] = ()
    command: bool = False


@dataclass
class Answers:
    """Which fuzzed commands were answered, counted from the events topics' messages."""

    sent: dict[str, list[str]] = field(default_factory=dict)  # command topic -> command ids
    unnamed: dict[str, int] = field(default_factory=dict)  # command topic -> id-less payloads

    def missing(self, events: Sequence[Received], events_topic_of: Callable[[str], str]) -> int:
        """How many commands got no answer on their events topic."""
        missing = 0
        for topic in set(self.sent) | set(self.unnamed):
            acked: set[str] = set()
            refusals = 0
            for message in events:
                if message.topic != events_topic_of(topic):
                    continue
                event = decoded_message(message.payload)
                if isinstance(event, CommandAck):
                    acked.add(event.command_id)
                elif isinstance(event, ErrorEvent) and _about(event, topic):
                    refusals += 1
            ids = self.sent.get(topic, [])
            answered_ids = sum(1 for command_id in set(ids) if command_id in acked)
            unanswered_ids = len(set(ids)) - answered_ids
            # Refusals without an id cover id-less payloads first, then unanswered ids.
            expected_refusals = self.unnamed.get(topic, 0) + unanswered_ids
            missing += max(0, expected_refusals - refusals)
        return missing


def decoded_message(payload: bytes) -> Message | None:
    try:
        return decode_message(payload)
    except FedgeError:
        return None  # an undecodable answer is no answer


def _about(event: ErrorEvent, topic: str) -> bool:
    return event.topic == topic or topic in event.message


def fleet_targets(
    topics: Topics, *, agent: str, camera: str, rounds: Sequence[int]
) -> list[FuzzTarget]:
    """Every topic an agent and the coordinator read, with seeds of what belongs there."""
    command_seeds: tuple[Seed, ...] = (
        {"kind": "ping", "command_id": "c"},
        {"kind": "status", "command_id": "c"},
        {"kind": "load_model", "command_id": "c", "path": "model.tflite", "version": "v"},
        {"kind": "set_options", "command_id": "c", "top_k": 2, "threshold": 0.5},
        {"kind": "label", "command_id": "c", "frame_id": "f", "label": "3"},
    )
    coordinator_seeds: tuple[Seed, ...] = (
        {"kind": "ping", "command_id": "c"},
        {"kind": "start_rounds", "command_id": "c", "rounds": 1, "options": {"epochs": 1}},
        {"kind": "stop_rounds", "command_id": "c", "reason": "x"},
    )
    status: Seed = {
        "kind": "agent_status",
        "agent": agent,
        "state": "online",
        "timestamp": 1.0,
        "capabilities": {"kind": "capabilities", "runtime": "x", "can_train": True},
    }
    complete: Seed = {
        "kind": "update_complete",
        "round": 1,
        "agent": agent,
        "base_model_version": "r0",
        "update_sha256": "0" * 64,
        "update_size_bytes": 10,
        "chunk_count": 1,
        "chunk_bytes": 10,
        "encoding": "float32",
        "num_examples": 1,
    }
    signed: Seed = {"kind": "signed", "payload": "{}", "signature": "AA==", "key_id": "k"}
    targets = [
        FuzzTarget(topics.agent_commands(agent), command_seeds, command=True),
        FuzzTarget(topics.coordinator_commands(), coordinator_seeds, command=True),
        FuzzTarget(topics.agent_status(agent), (status,)),
        FuzzTarget(topics.agent_status(f"{agent}-x"), (status,)),
        FuzzTarget(topics.camera_frames(camera)),
        FuzzTarget(topics.round_current(), (signed,)),
        FuzzTarget(topics.model_manifest("r9"), (signed,)),
        FuzzTarget(topics.blob_chunk("0" * 64, 0)),
    ]
    for number in rounds:
        targets.append(FuzzTarget(topics.update_manifest(number, agent), (complete,)))
        targets.append(FuzzTarget(topics.update_chunk(number, agent, 0)))
    return targets


class Fuzzer:
    """Publishes ``count`` payloads over ``targets`` with one seeded random generator."""

    def __init__(self, client: mqtt.Client, targets: Sequence[FuzzTarget], *, seed: int) -> None:
        self._client = client
        self._targets = list(targets)
        self._rng = random.Random(seed)  # noqa: S311 - reproducible noise, not secrecy
        self.answers = Answers()
        self.published = 0

    def run(
        self, count: int, *, every: int = 0, check: Callable[[int], None] | None = None
    ) -> None:
        """Publish ``count`` payloads; call ``check(n)`` after every ``every`` of them."""
        for number in range(1, count + 1):
            target = self._rng.choice(self._targets)
            payload, command_id = self._payload(target)
            qos = 1 if target.command else self._rng.choice((0, 1))
            if target.command:
                if command_id is None:
                    self.answers.unnamed[target.topic] = (
                        self.answers.unnamed.get(target.topic, 0) + 1
                    )
                else:
                    self.answers.sent.setdefault(target.topic, []).append(command_id)
            publish(self._client, target.topic, payload, qos=qos)
            self.published += 1
            if check is not None and every and number % every == 0:
                check(number)

    def _payload(self, target: FuzzTarget) -> tuple[bytes, str | None]:
        rng = self._rng
        if not target.seeds or rng.random() < 0.25:
            return rng.randbytes(rng.randrange(MAX_RANDOM_BYTES)), None
        message = json.loads(json.dumps(rng.choice(target.seeds)))
        command_id = None
        if target.command:
            command_id = f"fz-{self.published}-{rng.randrange(10**6)}"
            message["command_id"] = command_id
        for _ in range(rng.randrange(1, 4)):
            self._mutate(message, protect="command_id" if target.command else None)
        text = json.dumps(message, allow_nan=True).encode()
        if rng.random() < 0.15:
            text = _damage(text, rng)
        # Whether the damaged text still names its id is for the receiver to find out; an
        # answer without the id counts as a refusal of an unnamed command.
        if command_id is not None and command_id.encode() not in text:
            command_id = None
        return text, command_id

    def _mutate(self, message: Seed, *, protect: str | None) -> None:
        rng = self._rng
        keys = [key for key in message if key != protect]
        choice = rng.random()
        if keys and choice < 0.4:
            message[rng.choice(keys)] = rng.choice(_JSON_ODDITIES)
        elif keys and choice < 0.6:
            del message[rng.choice(keys)]
        elif choice < 0.75:
            message[f"extra{rng.randrange(100)}"] = rng.choice(_JSON_ODDITIES)
        elif "options" in message or choice < 0.85:
            message["options"] = {
                rng.choice(("epochs", "update_encoding", "learning_rate", "augment", "mu")): (
                    rng.choice(_JSON_ODDITIES[:12])
                )
            }
        elif keys:
            key = rng.choice(keys)
            message[key] = str(message[key]) * rng.randrange(1, 50)


def _damage(text: bytes, rng: random.Random) -> bytes:
    data = bytearray(text)
    if rng.random() < 0.5 and data:
        return bytes(data[: rng.randrange(len(data))])
    for _ in range(rng.randrange(1, 8)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)
