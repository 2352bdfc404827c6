"""Every MQTT topic fedge uses is built and parsed here, and nowhere else.

Layout under a configurable root (default ``fedge``) and a fleet name::

    <root>/<fleet>/agents/<agent>/status                  retained; LWT "offline"
    <root>/<fleet>/agents/<agent>/commands
    <root>/<fleet>/agents/<agent>/events                  acks and errors
    <root>/<fleet>/agents/<agent>/results                 inference results
    <root>/<fleet>/cameras/<camera>/frames                a camera is anything publishing here
    <root>/<fleet>/coordinator/status                     retained
    <root>/<fleet>/coordinator/commands
    <root>/<fleet>/coordinator/events
    <root>/<fleet>/rounds/current                         retained, signed announcement
    <root>/<fleet>/models/<version>/manifest              retained signed release
    <root>/<fleet>/blobs/<sha256>/chunks/<index>          retained while referenced
    <root>/<fleet>/rounds/<round>/updates/<agent>/manifest
    <root>/<fleet>/rounds/<round>/updates/<agent>/chunks/<index>
    <root>/<fleet>/rounds/<round>/secagg/<stage>                  signed: directory, unmask
    <root>/<fleet>/rounds/<round>/secagg/inbox/<agent>            signed: shares for one agent
    <root>/<fleet>/rounds/<round>/secagg/agents/<agent>/<stage>   keys, shares, revealed
    <root>/<fleet>/tasks/<task>/rounds/current            the same round, model, blob and
    <root>/<fleet>/tasks/<task>/...                        update topics, per task, when
                                                           several tasks run at once

Ids (fleet, agent, camera, model version) are 1..64 characters of ``[A-Za-z0-9_.-]``, so
they can never contain ``/``, ``+`` or ``#`` or be empty. Rounds and chunk indexes are
non-negative decimal integers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import TopicError

__all__ = [
    "DEFAULT_FLEET",
    "DEFAULT_ROOT",
    "MAX_ID_CHARS",
    "ParsedTopic",
    "TopicKind",
    "Topics",
    "sender",
    "topic_matches",
    "validate_filter",
    "validate_id",
]

DEFAULT_ROOT = "fedge"
DEFAULT_FLEET = "default"
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


def _validate_index(value: int, *, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INDEX:
        raise TopicError(f"{what} {value!r} is not an integer in 0..{MAX_INDEX}", reason="bad_id")
    return value


def _parse_index(text: str, *, what: str) -> int:
    if not _INDEX_PATTERN.fullmatch(text):
        raise TopicError(f"{what} {text!r} is not a decimal integer", reason="bad_topic")
    return _validate_index(int(text), what=what)


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


class Topics:
    """Builds and parses the topics of one fleet under one root prefix."""

    def __init__(
        self, *, root: str = DEFAULT_ROOT, fleet: str = DEFAULT_FLEET, task: str | None = None
    ) -> None:
        root_levels = root.split("/")
        for level in root_levels:
            validate_id(level, what="root level")
        self.root = root
        self.fleet = validate_id(fleet, what="fleet")
        self.task = None if task is None else validate_id(task, what="task")
        self._base = f"{root}/{fleet}"
        self._base_levels = len(root_levels) + 1
        # A task's rounds, models, blobs and updates live under its own level, so tasks that
        # run at once on one fleet never see each other's; agents and cameras stay shared.
        self._work = self._base if task is None else f"{self._base}/tasks/{task}"

    def __repr__(self) -> str:
        task = f", task={self.task!r}" if self.task is not None else ""
        return f"Topics(root={self.root!r}, fleet={self.fleet!r}{task})"

    def for_task(self, task: str) -> Topics:
        """The same fleet's topics for one of several tasks run at once."""
        return Topics(root=self.root, fleet=self.fleet, task=task)

    def all_task_announcements(self) -> str:
        """Filter for the current-round announcement of every named task."""
        return f"{self._base}/tasks/+/rounds/current"

    def task_of(self, topic: str) -> str | None:
        """The task a topic of this fleet names (``.../tasks/<task>/...``), else None."""
        levels = topic.split("/")[self._base_levels :]
        if not topic.startswith(self._base + "/") or len(levels) < 3 or levels[0] != "tasks":
            return None
        return validate_id(levels[1], what="task")

    # agents
    def agent_status(self, agent: str) -> str:
        return self._agent(agent, "status")

    def agent_commands(self, agent: str) -> str:
        return self._agent(agent, "commands")

    def agent_events(self, agent: str) -> str:
        return self._agent(agent, "events")

    def agent_results(self, agent: str) -> str:
        return self._agent(agent, "results")

    def all_agent_statuses(self) -> str:
        return f"{self._base}/agents/+/status"

    def all_agent_events(self) -> str:
        return f"{self._base}/agents/+/events"

    def all_agent_results(self) -> str:
        return f"{self._base}/agents/+/results"

    def _agent(self, agent: str, leaf: str) -> str:
        return f"{self._base}/agents/{validate_id(agent, what='agent id')}/{leaf}"

    # cameras
    def camera_frames(self, camera: str) -> str:
        return f"{self._base}/cameras/{validate_id(camera, what='camera id')}/frames"

    def all_camera_frames(self) -> str:
        return f"{self._base}/cameras/+/frames"

    # coordinator
    def coordinator_status(self) -> str:
        return f"{self._base}/coordinator/status"

    def coordinator_commands(self) -> str:
        return f"{self._base}/coordinator/commands"

    def coordinator_events(self) -> str:
        return f"{self._base}/coordinator/events"

    # rounds and models
    def round_current(self) -> str:
        return f"{self._work}/rounds/current"

    def model_manifest(self, version: str) -> str:
        return f"{self._model(version)}/manifest"

    def model_chunk(self, version: str, index: int) -> str:
        return f"{self._model(version)}/chunks/{_validate_index(index, what='chunk index')}"

    def model_chunks(self, version: str) -> str:
        """Filter for every chunk of one model version."""
        return f"{self._model(version)}/chunks/+"

    def blob_chunk(self, sha256: str, index: int) -> str:
        """A chunk of a content-addressed blob (model weights, .tflite files)."""
        digest = validate_id(sha256, what="blob hash")
        return f"{self._work}/blobs/{digest}/chunks/{_validate_index(index, what='chunk index')}"

    def all_model_manifests(self) -> str:
        return f"{self._work}/models/+/manifest"

    def all_blob_chunks(self) -> str:
        return f"{self._work}/blobs/+/chunks/+"

    def _model(self, version: str) -> str:
        return f"{self._work}/models/{validate_id(version, what='model version')}"

    def update_manifest(self, round_number: int, agent: str) -> str:
        return f"{self._update(round_number, agent)}/manifest"

    def update_chunk(self, round_number: int, agent: str, index: int) -> str:
        chunk = _validate_index(index, what="chunk index")
        return f"{self._update(round_number, agent)}/chunks/{chunk}"

    def round_updates(self, round_number: int) -> str:
        """Filter for every update manifest and chunk of one round."""
        return f"{self._work}/rounds/{_validate_index(round_number, what='round')}/updates/#"

    def all_update_manifests(self) -> str:
        """Filter for the update manifest of every agent in every round (no chunks)."""
        return f"{self._work}/rounds/+/updates/+/manifest"

    def _update(self, round_number: int, agent: str) -> str:
        number = _validate_index(round_number, what="round")
        return f"{self._work}/rounds/{number}/updates/{validate_id(agent, what='agent id')}"

    # split learning: one batch's activations go up, its gradient comes down
    def split_manifest(self, round_number: int, agent: str, step: int, direction: str) -> str:
        return f"{self._split(round_number, agent, step, direction)}/manifest"

    def split_chunk(
        self, round_number: int, agent: str, step: int, direction: str, index: int
    ) -> str:
        chunk = _validate_index(index, what="chunk index")
        return f"{self._split(round_number, agent, step, direction)}/{chunk}"

    def split_done(self, round_number: int, agent: str, step: int) -> str:
        """The agent applied the batch's gradient to its part: the coordinator may commit."""
        return f"{self._split_batch(round_number, agent, step)}/done"

    def all_split_uploads(self) -> str:
        """Filter for every agent's activations and done notices (the coordinator's side)."""
        return f"{self._work}/split/+/+/+/up/#"

    def all_split_done(self) -> str:
        return f"{self._work}/split/+/+/+/done"

    def agent_split_downloads(self, agent: str) -> str:
        """Filter for the gradients sent to one agent."""
        return f"{self._work}/split/+/{validate_id(agent, what='agent id')}/+/down/#"

    def all_split_backs(self) -> str:
        """Filter for every agent's gradient at the top cut (U-shaped splits)."""
        return f"{self._work}/split/+/+/+/back/#"

    def all_split_lowers(self) -> str:
        """Filter for every agent's part at the end of its round (SplitFed's averaging)."""
        return f"{self._work}/split/+/+/+/lower/#"

    def agent_split_starts(self, agent: str) -> str:
        """Filter for the averaged part one agent starts its next round from."""
        return f"{self._work}/split/+/{validate_id(agent, what='agent id')}/+/start/#"

    def agent_split_middles(self, agent: str) -> str:
        """Filter for the middle part's outputs sent to one agent (U-shaped splits)."""
        return f"{self._work}/split/+/{validate_id(agent, what='agent id')}/+/mid/#"

    def _split(self, round_number: int, agent: str, step: int, direction: str) -> str:
        if direction not in _SPLIT_DIRECTIONS:
            raise TopicError(f"split direction must be one of {sorted(_SPLIT_DIRECTIONS)}")
        return f"{self._split_batch(round_number, agent, step)}/{direction}"

    def _split_batch(self, round_number: int, agent: str, step: int) -> str:
        number = _validate_index(round_number, what="round")
        batch = _validate_index(step, what="step")
        return f"{self._work}/split/{number}/{validate_id(agent, what='agent id')}/{batch}"

    # secure aggregation
    def secagg_broadcast(self, round_number: int, stage: str) -> str:
        return f"{self._secagg(round_number)}/{_stage(stage, SECAGG_BROADCAST_STAGES)}"

    def secagg_inbox(self, round_number: int, agent: str) -> str:
        return f"{self._secagg(round_number)}/inbox/{validate_id(agent, what='agent id')}"

    def secagg_from_agent(self, round_number: int, agent: str, stage: str) -> str:
        agent_id = validate_id(agent, what="agent id")
        return (
            f"{self._secagg(round_number)}/agents/{agent_id}/{_stage(stage, SECAGG_AGENT_STAGES)}"
        )

    def all_secagg_broadcasts(self) -> str:
        return f"{self._work}/rounds/+/secagg/+"

    def all_secagg_inboxes(self, agent: str) -> str:
        return f"{self._work}/rounds/+/secagg/inbox/{validate_id(agent, what='agent id')}"

    def all_secagg_from_agents(self) -> str:
        return f"{self._work}/rounds/+/secagg/agents/+/+"

    def _secagg(self, round_number: int) -> str:
        return f"{self._work}/rounds/{_validate_index(round_number, what='round')}/secagg"

    # parsing
    def parse(self, topic: str) -> ParsedTopic:
        """Name what a concrete topic of this fleet is, or raise :class:`TopicError`."""
        if not isinstance(topic, str) or len(topic) > MAX_TOPIC_CHARS:
            raise TopicError("topic is not a string of at most 1024 characters")
        prefix = self._base + "/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not under {self._base!r}")
        levels = topic[len(prefix) :].split("/")
        task = None
        if levels[0] == "tasks" and len(levels) > 2:
            task, levels = levels[1], levels[2:]
        parsed = _parse_levels(levels)
        if parsed is None or (task is not None and parsed.kind in _FLEET_KINDS):
            raise TopicError(f"topic {topic!r} is not a fedge topic")
        if parsed.kind not in _FLEET_KINDS and task != self.task:
            # Another task's rounds (or the fleet's own, seen from a task): not ours.
            raise TopicError(f"topic {topic!r} belongs to task {task!r}, not {self.task!r}")
        return parsed


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
_SPLIT_DIRECTIONS = frozenset({"up", "down", "mid", "back", "lower", "start"})
# Topics every task shares; the rest (rounds, models, blobs, updates) are per task.
_FLEET_KINDS = frozenset(
    {*_AGENT_LEAVES.values(), *_COORDINATOR_LEAVES.values(), TopicKind.CAMERA_FRAMES}
)


def _parse_split(levels: list[str]) -> ParsedTopic | None:
    match levels:
        case ["split", number, agent, step, "done"]:
            kind, direction, index = TopicKind.SPLIT_DONE, None, None
        case ["split", number, agent, step, direction, "manifest"] if (
            direction in _SPLIT_DIRECTIONS
        ):
            kind, index = TopicKind.SPLIT_MANIFEST, None
        case ["split", number, agent, step, direction, chunk] if direction in _SPLIT_DIRECTIONS:
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


def _stage(stage: str, allowed: frozenset[str]) -> str:
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


def _parse_levels(levels: list[str]) -> ParsedTopic | None:  # noqa: PLR0911 - one return per shape
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
