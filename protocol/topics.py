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
non-negative decimal integers. The shared grammar (ids, kinds, reading levels back) is in
:mod:`protocol.topic_grammar`.
"""

from __future__ import annotations

from protocol.errors import TopicError
from protocol.topic_grammar import (
    FLEET_KINDS,
    MAX_ID_CHARS,
    MAX_TOPIC_CHARS,
    SECAGG_AGENT_STAGES,
    SECAGG_BROADCAST_STAGES,
    SPLIT_DIRECTIONS,
    ParsedTopic,
    TopicKind,
    parse_levels,
    secagg_stage,
    sender,
    topic_matches,
    validate_filter,
    validate_id,
    validate_index,
)

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
        return f"{self._model(version)}/chunks/{validate_index(index, what='chunk index')}"

    def model_chunks(self, version: str) -> str:
        """Filter for every chunk of one model version."""
        return f"{self._model(version)}/chunks/+"

    def blob_chunk(self, sha256: str, index: int) -> str:
        """A chunk of a content-addressed blob (model weights, .tflite files)."""
        digest = validate_id(sha256, what="blob hash")
        return f"{self._work}/blobs/{digest}/chunks/{validate_index(index, what='chunk index')}"

    def all_model_manifests(self) -> str:
        return f"{self._work}/models/+/manifest"

    def all_blob_chunks(self) -> str:
        return f"{self._work}/blobs/+/chunks/+"

    def _model(self, version: str) -> str:
        return f"{self._work}/models/{validate_id(version, what='model version')}"

    def update_manifest(self, round_number: int, agent: str) -> str:
        return f"{self._update(round_number, agent)}/manifest"

    def update_chunk(self, round_number: int, agent: str, index: int) -> str:
        chunk = validate_index(index, what="chunk index")
        return f"{self._update(round_number, agent)}/chunks/{chunk}"

    def round_updates(self, round_number: int) -> str:
        """Filter for every update manifest and chunk of one round."""
        return f"{self._work}/rounds/{validate_index(round_number, what='round')}/updates/#"

    def all_update_manifests(self) -> str:
        """Filter for the update manifest of every agent in every round (no chunks)."""
        return f"{self._work}/rounds/+/updates/+/manifest"

    def _update(self, round_number: int, agent: str) -> str:
        number = validate_index(round_number, what="round")
        return f"{self._work}/rounds/{number}/updates/{validate_id(agent, what='agent id')}"

    # split learning: one batch's activations go up, its gradient comes down
    def split_manifest(self, round_number: int, agent: str, step: int, direction: str) -> str:
        return f"{self._split(round_number, agent, step, direction)}/manifest"

    def split_chunk(
        self, round_number: int, agent: str, step: int, direction: str, index: int
    ) -> str:
        chunk = validate_index(index, what="chunk index")
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
        if direction not in SPLIT_DIRECTIONS:
            raise TopicError(f"split direction must be one of {sorted(SPLIT_DIRECTIONS)}")
        return f"{self._split_batch(round_number, agent, step)}/{direction}"

    def _split_batch(self, round_number: int, agent: str, step: int) -> str:
        number = validate_index(round_number, what="round")
        batch = validate_index(step, what="step")
        return f"{self._work}/split/{number}/{validate_id(agent, what='agent id')}/{batch}"

    # secure aggregation
    def secagg_broadcast(self, round_number: int, stage: str) -> str:
        return f"{self._secagg(round_number)}/{secagg_stage(stage, SECAGG_BROADCAST_STAGES)}"

    def secagg_inbox(self, round_number: int, agent: str) -> str:
        return f"{self._secagg(round_number)}/inbox/{validate_id(agent, what='agent id')}"

    def secagg_from_agent(self, round_number: int, agent: str, stage: str) -> str:
        agent_id = validate_id(agent, what="agent id")
        stage_level = secagg_stage(stage, SECAGG_AGENT_STAGES)
        return f"{self._secagg(round_number)}/agents/{agent_id}/{stage_level}"

    def all_secagg_broadcasts(self) -> str:
        return f"{self._work}/rounds/+/secagg/+"

    def all_secagg_inboxes(self, agent: str) -> str:
        return f"{self._work}/rounds/+/secagg/inbox/{validate_id(agent, what='agent id')}"

    def all_secagg_from_agents(self) -> str:
        return f"{self._work}/rounds/+/secagg/agents/+/+"

    def _secagg(self, round_number: int) -> str:
        return f"{self._work}/rounds/{validate_index(round_number, what='round')}/secagg"

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
        parsed = parse_levels(levels)
        if parsed is None or (task is not None and parsed.kind in FLEET_KINDS):
            raise TopicError(f"topic {topic!r} is not a fedge topic")
        if parsed.kind not in FLEET_KINDS and task != self.task:
            # Another task's rounds (or the fleet's own, seen from a task): not ours.
            raise TopicError(f"topic {topic!r} belongs to task {task!r}, not {self.task!r}")
        return parsed
