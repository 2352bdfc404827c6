"""The grammar of fedge's topics: ids, indexes, topic kinds, filters, and reading levels.

:mod:`protocol.topics` builds every topic and names what a concrete one is; this module holds
what both sides share: which characters an id may have, what each kind of topic carries,
and how the levels under a fleet (or a task) are read back. Nothing here knows a root or a
fleet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import TopicError

__all__ = [
    "FLEET_KINDS",
    "MAX_ID_CHARS",
    "MAX_TOPIC_CHARS",
    "SECAGG_AGENT_STAGES",
    "SECAGG_BROADCAST_STAGES",
    "SPLIT_DIRECTIONS",
    "ParsedTopic",
    "TopicKind",
    "parse_levels",
    "secagg_stage",
    "sender",
    "topic_matches",
    "validate_filter",
    "validate_id",
    "validate_index",
]

MAX_ID_CHARS = 64
MAX_TOPIC_CHARS = 1024
MAX_INDEX = 10**9

_ID_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_INDEX_PATTERN = re.compile(r"0|[1-9][0-9]{0,9}")


class TopicKind(StrEnum):
    AGENT_STATUS = "agent_status"
    AGENT_COMMANDS = "agent_commands"
    AGENT_EVENTS = "agent_events"
    AGENT_RESULTS = "agent_results"
    CAMERA_FRAMES = "camera_frames"
    COORDINATOR_STATUS = "coordinator_status"
    COORDINATOR_COMMANDS = "coordinator_commands"
    COORDINATOR_EVENTS = "coordinator_events"
    ROUND_CURRENT = "round_current"
    MODEL_MANIFEST = "model_manifest"
    MODEL_CHUNK = "model_chunk"
    BLOB_CHUNK = "blob_chunk"
    UPDATE_MANIFEST = "update_manifest"
    UPDATE_CHUNK = "update_chunk"
    SPLIT_MANIFEST = "split_manifest"
    SPLIT_CHUNK = "split_chunk"
    SPLIT_DONE = "split_done"
    SECAGG_BROADCAST = "secagg_broadcast"
    SECAGG_INBOX = "secagg_inbox"
    SECAGG_AGENT = "secagg_agent"


SECAGG_BROADCAST_STAGES = frozenset({"directory", "unmask"})
SECAGG_AGENT_STAGES = frozenset({"keys", "shares", "revealed"})


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """What a fedge topic names; fields that the kind does not use are ``None``."""

    kind: TopicKind
    agent: str | None = None
    camera: str | None = None
    version: str | None = None
    round: int | None = None
    index: int | None = None
    step: int | None = None
    direction: str | None = None
    stage: str | None = None


def sender(parsed: ParsedTopic, claimed: str | None = None) -> str:
    """The agent a message came from: the one its topic names, never its payload's say-so.

    The broker's ACL decides who may publish on which topic, so only the topic is evidence;
    a payload naming another agent (``claimed``) is refused with reason ``wrong_agent``.
    """
    if parsed.agent is None:
        raise TopicError(f"a {parsed.kind.value} topic names no agent", reason="wrong_topic")
    if claimed is not None and claimed != parsed.agent:
        raise TopicError(
            f"a message on agent {parsed.agent}'s topic claims to come from agent {claimed}",
            reason="wrong_agent",
        )
    return parsed.agent


def validate_id(value: str, *, what: str = "id") -> str:
    """Return ``value`` if it is usable as one topic level, else raise :class:`TopicError`."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise TopicError(
            f"{what} {value!r} is not 1-{MAX_ID_CHARS} characters of letters, digits, _ . -",
            reason="bad_id",
        )
    if value in {".", ".."}:
        raise TopicError(f"{what} {value!r} is reserved", reason="bad_id")
    return value


def validate_index(value: int, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INDEX:
        raise TopicError(f"{what} {value!r} is not an integer in 0..{MAX_INDEX}", reason="bad_id")
    return value


def _parse_index(text: str, *, what: str) -> int:
    if not _INDEX_PATTERN.fullmatch(text):
        raise TopicError(f"{what} {text!r} is not a decimal integer", reason="bad_topic")
    return validate_index(int(text), what=what)


def validate_filter(topic_filter: str) -> str:
    """Check an MQTT topic filter: ``#`` only last and alone in its level, ``+`` alone."""
    if not topic_filter or len(topic_filter) > MAX_TOPIC_CHARS or "\x00" in topic_filter:
        raise TopicError(f"topic filter {topic_filter!r} is empty, too long or has NUL")
    levels = topic_filter.split("/")
    for position, level in enumerate(levels):
        if "#" in level and (level != "#" or position != len(levels) - 1):
            raise TopicError(f"'#' must be the whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise TopicError(f"'+' must be a whole level in {topic_filter!r}")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True if the concrete ``topic`` matches the MQTT ``topic_filter`` (pure, no I/O)."""
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    # Topics starting with '$' (broker internals) never match a leading wildcard (MQTT 4.7.2).
    if topic.startswith("$") and filter_levels[0] in {"+", "#"}:
        return False
    for position, level in enumerate(filter_levels):
        if level == "#":
            return True
        if position >= len(topic_levels):
            return False
        if level not in {"+", topic_levels[position]}:
            return False
    return len(filter_levels) == len(topic_levels)


_AGENT_LEAVES = {
    "status": TopicKind.AGENT_STATUS,
    "commands": TopicKind.AGENT_COMMANDS,
    "events": TopicKind.AGENT_EVENTS,
    "results": TopicKind.AGENT_RESULTS,
}
_COORDINATOR_LEAVES = {
    "status": TopicKind.COORDINATOR_STATUS,
    "commands": TopicKind.COORDINATOR_COMMANDS,
    "events": TopicKind.COORDINATOR_EVENTS,
}

# up and down for every split; mid and back too for a U-shaped one (labels stay on the agent);
# lower (an agent's part after its round) and start (their average, for the next round)
SPLIT_DIRECTIONS = frozenset({"up", "down", "mid", "back", "lower", "start"})
# Topics every task shares; the rest (rounds, models, blobs, updates) are per task.
FLEET_KINDS = frozenset(
    {*_AGENT_LEAVES.values(), *_COORDINATOR_LEAVES.values(), TopicKind.CAMERA_FRAMES}
)


def _parse_split(levels: list[str]) -> ParsedTopic | None:
    match levels:
        case ["split", number, agent, step, "done"]:
            kind, direction, index = TopicKind.SPLIT_DONE, None, None
        case ["split", number, agent, step, direction, "manifest"] if direction in SPLIT_DIRECTIONS:
            kind, index = TopicKind.SPLIT_MANIFEST, None
        case ["split", number, agent, step, direction, chunk] if direction in SPLIT_DIRECTIONS:
            kind, index = TopicKind.SPLIT_CHUNK, _parse_index(chunk, what="chunk index")
        case _:
            return None
    return ParsedTopic(
        kind,
        round=_parse_index(number, what="round"),
        agent=validate_id(agent, what="agent id"),
        step=_parse_index(step, what="step"),
        direction=direction,
        index=index,
    )


def secagg_stage(stage: str, allowed: frozenset[str]) -> str:
    if stage not in allowed:
        raise TopicError(f"secure aggregation stage {stage!r} is not one of {sorted(allowed)}")
    return stage


def _parse_secagg(levels: list[str]) -> ParsedTopic | None:
    match levels:
        case [number, "secagg", stage] if stage in SECAGG_BROADCAST_STAGES:
            return ParsedTopic(
                TopicKind.SECAGG_BROADCAST, round=_parse_index(number, what="round"), stage=stage
            )
        case [number, "secagg", "inbox", agent]:
            return ParsedTopic(
                TopicKind.SECAGG_INBOX,
                round=_parse_index(number, what="round"),
                agent=validate_id(agent, what="agent id"),
            )
        case [number, "secagg", "agents", agent, stage] if stage in SECAGG_AGENT_STAGES:
            return ParsedTopic(
                TopicKind.SECAGG_AGENT,
                round=_parse_index(number, what="round"),
                agent=validate_id(agent, what="agent id"),
                stage=stage,
            )
    return None


def parse_levels(levels: list[str]) -> ParsedTopic | None:  # noqa: PLR0911 - one return per shape
    if levels and levels[0] == "split":
        return _parse_split(levels)
    if len(levels) > 2 and levels[0] == "rounds" and levels[2] == "secagg":
        return _parse_secagg(levels[1:])
    match levels:
        case ["agents", agent, leaf] if leaf in _AGENT_LEAVES:
            return ParsedTopic(_AGENT_LEAVES[leaf], agent=validate_id(agent, what="agent id"))
        case ["cameras", camera, "frames"]:
            return ParsedTopic(TopicKind.CAMERA_FRAMES, camera=validate_id(camera, what="camera"))
        case ["coordinator", leaf] if leaf in _COORDINATOR_LEAVES:
            return ParsedTopic(_COORDINATOR_LEAVES[leaf])
        case ["blobs", digest, "chunks", index]:
            return ParsedTopic(
                TopicKind.BLOB_CHUNK,
                version=validate_id(digest, what="blob hash"),
                index=_parse_index(index, what="chunk index"),
            )
        case ["rounds", "current"]:
            return ParsedTopic(TopicKind.ROUND_CURRENT)
        case ["models", version, "manifest"]:
            return ParsedTopic(TopicKind.MODEL_MANIFEST, version=validate_id(version))
        case ["models", version, "chunks", index]:
            return ParsedTopic(
                TopicKind.MODEL_CHUNK,
                version=validate_id(version),
                index=_parse_index(index, what="chunk index"),
            )
        case ["rounds", number, "updates", agent, "manifest"]:
            return ParsedTopic(
                TopicKind.UPDATE_MANIFEST,
                round=_parse_index(number, what="round"),
                agent=validate_id(agent, what="agent id"),
            )
        case ["rounds", number, "updates", agent, "chunks", index]:
            return ParsedTopic(
                TopicKind.UPDATE_CHUNK,
                round=_parse_index(number, what="round"),
                agent=validate_id(agent, what="agent id"),
                index=_parse_index(index, what="chunk index"),
            )
    return None
