from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FedgeError, TopicError
from protocol.topics import (
    ParsedTopic,
    TopicKind,
    Topics,
    sender,
    topic_matches,
    validate_filter,
)

TOPICS = Topics(root="site1/fedge", fleet="lab")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (TOPICS.agent_status("pi-1"), ParsedTopic(TopicKind.AGENT_STATUS, agent="pi-1")),
        (TOPICS.agent_commands("pi-1"), ParsedTopic(TopicKind.AGENT_COMMANDS, agent="pi-1")),
        (TOPICS.agent_events("pi-1"), ParsedTopic(TopicKind.AGENT_EVENTS, agent="pi-1")),
        (TOPICS.agent_results("pi-1"), ParsedTopic(TopicKind.AGENT_RESULTS, agent="pi-1")),
        (TOPICS.camera_frames("door"), ParsedTopic(TopicKind.CAMERA_FRAMES, camera="door")),
        (TOPICS.coordinator_status(), ParsedTopic(TopicKind.COORDINATOR_STATUS)),
        (TOPICS.coordinator_commands(), ParsedTopic(TopicKind.COORDINATOR_COMMANDS)),
        (TOPICS.coordinator_events(), ParsedTopic(TopicKind.COORDINATOR_EVENTS)),
        (TOPICS.round_current(), ParsedTopic(TopicKind.ROUND_CURRENT)),
        (TOPICS.model_manifest("v3"), ParsedTopic(TopicKind.MODEL_MANIFEST, version="v3")),
        (
            TOPICS.model_chunk("v3", 17),
            ParsedTopic(TopicKind.MODEL_CHUNK, version="v3", index=17),
        ),
        (
            TOPICS.blob_chunk("ab" * 32, 3),
            ParsedTopic(TopicKind.BLOB_CHUNK, version="ab" * 32, index=3),
        ),
        (
            TOPICS.update_manifest(4, "pi-1"),
            ParsedTopic(TopicKind.UPDATE_MANIFEST, round=4, agent="pi-1"),
        ),
        (
            TOPICS.update_chunk(4, "pi-1", 0),
            ParsedTopic(TopicKind.UPDATE_CHUNK, round=4, agent="pi-1", index=0),
        ),
    ],
)
def test_every_topic_round_trips_through_parse(topic: str, expected: ParsedTopic) -> None:
    assert topic.startswith("site1/fedge/lab/")
    assert TOPICS.parse(topic) == expected


def test_topic_layout_is_the_documented_one() -> None:
    topics = Topics()
    assert topics.agent_status("a") == "fedge/default/agents/a/status"
    assert topics.all_camera_frames() == "fedge/default/cameras/+/frames"
    assert topics.model_chunk("v1", 2) == "fedge/default/models/v1/chunks/2"
    assert topics.update_chunk(3, "a", 5) == "fedge/default/rounds/3/updates/a/chunks/5"
    assert topics.round_updates(3) == "fedge/default/rounds/3/updates/#"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "+", "#", "x" * 65, "..", "a b", "é"])
def test_ids_that_would_break_a_topic_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        TOPICS.agent_status(bad)
    with pytest.raises(TopicError):
        Topics(fleet=bad)


@pytest.mark.parametrize("index", [-1, 10**9 + 1, True])
def test_bad_indexes_are_refused(index: int) -> None:
    with pytest.raises(TopicError):
        TOPICS.model_chunk("v1", index)


@pytest.mark.parametrize(
    "topic",
    [
        "other/lab/agents/a/status",
        "site1/fedge/lab/agents/a/unknown",
        "site1/fedge/lab/models/v1/chunks/01",
        "site1/fedge/lab/models/v1/chunks/-1",
        "site1/fedge/lab/rounds/x/updates/a/manifest",
        "site1/fedge/lab/agents/+/status",
        "site1/fedge/lab",
    ],
)
def test_foreign_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(TopicError):
        TOPICS.parse(topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/#", "$SYS/x", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        (TOPICS.all_camera_frames(), TOPICS.camera_frames("door"), True),
        (TOPICS.model_chunks("v1"), TOPICS.model_chunk("v1", 9), True),
        (TOPICS.model_chunks("v1"), TOPICS.model_chunk("v2", 9), False),
        (TOPICS.round_updates(2), TOPICS.update_chunk(2, "a", 1), True),
        (TOPICS.all_update_manifests(), TOPICS.update_manifest(2, "a"), True),
        (TOPICS.all_update_manifests(), TOPICS.update_chunk(2, "a", 1), False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, *, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b", "a/\x00"])
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(TopicError):
        validate_filter(bad)


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=200))
def test_parse_of_random_text_raises_only_fedge_errors(text: str) -> None:
    try:
        parsed = TOPICS.parse(text)
    except FedgeError:
        return
    assert isinstance(parsed, ParsedTopic)


def test_the_sender_is_the_agent_of_the_topic() -> None:
    parsed = TOPICS.parse(TOPICS.agent_status("pi-1"))
    assert sender(parsed) == "pi-1"
    assert sender(parsed, "pi-1") == "pi-1"
    with pytest.raises(TopicError) as refused:
        sender(parsed, "pi-2")
    assert refused.value.reason == "wrong_agent"
    with pytest.raises(TopicError):
        sender(TOPICS.parse(TOPICS.coordinator_status()))


def test_a_task_has_its_own_round_topics_and_shares_the_fleet_ones() -> None:
    task = TOPICS.for_task("door")
    assert task.round_current() == "site1/fedge/lab/tasks/door/rounds/current"
    assert (
        task.update_chunk(4, "pi-1", 0)
        == "site1/fedge/lab/tasks/door/rounds/4/updates/pi-1/chunks/0"
    )
    assert task.blob_chunk("ab" * 32, 1).startswith("site1/fedge/lab/tasks/door/blobs/")
    assert task.agent_status("pi-1") == TOPICS.agent_status("pi-1")
    assert task.coordinator_events() == TOPICS.coordinator_events()
    assert task.parse(task.update_manifest(4, "pi-1")) == TOPICS.parse(
        TOPICS.update_manifest(4, "pi-1")
    )
    assert task.parse(TOPICS.agent_status("pi-1")).kind is TopicKind.AGENT_STATUS
    assert topic_matches(TOPICS.all_task_announcements(), task.round_current())
    assert TOPICS.task_of(task.model_manifest("r1")) == "door"
    assert TOPICS.task_of(TOPICS.model_manifest("r1")) is None


@pytest.mark.parametrize(
    ("reader", "topic"),
    [
        (TOPICS, TOPICS.for_task("door").round_current()),
        (TOPICS, TOPICS.for_task("door").update_chunk(1, "a", 0)),
        (TOPICS.for_task("door"), TOPICS.round_current()),
        (TOPICS.for_task("door"), TOPICS.for_task("gate").update_manifest(1, "a")),
        (TOPICS.for_task("door"), "site1/fedge/lab/tasks/door/agents/a/status"),
    ],
)
def test_a_task_never_reads_another_tasks_round_topics(reader: Topics, topic: str) -> None:
    with pytest.raises(TopicError):
        reader.parse(topic)
