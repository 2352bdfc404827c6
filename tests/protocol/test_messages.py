from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from protocol.errors import FedgeError, MessageError
from protocol.messages.agent import (
    AgentState,
    AgentStatus,
    Capabilities,
    CommandAck,
    ErrorEvent,
    InferenceResult,
    Prediction,
    Timings,
)
from protocol.messages.base import Message
from protocol.messages.codec import MESSAGE_TYPES, decode_message, encode_message, message_schema
from protocol.messages.commands import LabelFrame, Ping, SetOptions, StartRounds
from protocol.messages.rounds import (
    BlobRef,
    ModelMetrics,
    ModelRelease,
    RoundAnnouncement,
    RoundConfig,
    UpdateComplete,
    UpdateEncoding,
)
from protocol.preprocess import ColorOrder, PreprocessSpec

SHA = "ab" * 32

EXAMPLES: list[Message] = [
    AgentStatus(
        agent="pi-1",
        state=AgentState.ONLINE,
        timestamp=1.5,
        capabilities=Capabilities(runtime="ai_edge_litert 2.3.0", can_train=True),
        samples_by_label={"3": 4},
    ),
    InferenceResult(
        agent="pi-1",
        source="door",
        frame_id="f-1",
        model_version="v1",
        timestamp=2.0,
        timings=Timings(decode_ms=1.0, preprocess_ms=0.2, invoke_ms=3.0, total_ms=4.3),
        predictions=(Prediction(index=3, label="3", score=0.9),),
    ),
    CommandAck(command_id="c1", command="ping", ok=True, detail={"pong": True}),
    ErrorEvent(reason="undecodable", message="not an image", topic="x/y"),
    Ping(command_id="c1"),
    SetOptions(command_id="c2", max_fps=5.0, top_k=2),
    LabelFrame(command_id="c3", frame_id="f-9", label="cat"),
    StartRounds(command_id="c4", rounds=3, min_agents=2, deadline_s=30.0),
    RoundAnnouncement(
        round=1,
        release=ModelRelease(
            version="r1",
            model_name="digits_cnn",
            round=1,
            weights=BlobRef(sha256=SHA, size_bytes=10, chunk_count=1, chunk_bytes=100),
            trainable=BlobRef(sha256=SHA, size_bytes=10, chunk_count=1, chunk_bytes=100),
            labels=("0", "1"),
            preprocess=PreprocessSpec(height=8, width=8, color=ColorOrder.GRAY),
            metrics=ModelMetrics(accuracy=0.5, evaluated_on=10),
        ),
        selected=("a", "b"),
        config=RoundConfig(),
        deadline_at=100.0,
        issued_at=40.0,
    ),
    UpdateComplete(
        round=1,
        agent="a",
        base_model_version="v1",
        update_sha256=SHA,
        update_size_bytes=5,
        chunk_count=1,
        chunk_bytes=100,
        encoding=UpdateEncoding.INT8,
        num_examples=12,
        accuracy=0.5,
    ),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_messages_round_trip(message: Message) -> None:
    decoded: Message = decode_message(encode_message(message))
    assert decoded == message
    assert type(decoded) is type(message)


def test_expected_kind_is_enforced() -> None:
    data = encode_message(Ping(command_id="x"))
    assert isinstance(decode_message(data, Ping), Ping)
    with pytest.raises(MessageError) as excinfo:
        decode_message(data, (SetOptions, LabelFrame))
    assert excinfo.value.reason == "unexpected_kind"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b'{"kind": "ping"}', "command_id"),
        (b'{"kind": "ping", "command_id": "x", "extra": 1}', "extra"),
        (b'{"kind": "nope"}', "kind"),
        (b'{"kind": "set_options", "command_id": "x", "max_fps": "5"}', "max_fps"),
        (b'{"kind": "set_options", "command_id": "x", "top_k": 0}', "top_k"),
        (b'{"kind": "label", "command_id": "x", "frame_id": "f", "label": "a/b"}', "label"),
        (b"[1, 2]", "message"),
        (b"\xff\xfe", "JSON"),
        (b"", "JSON"),
    ],
)
def test_invalid_messages_say_what_is_wrong(payload: bytes, fragment: str) -> None:
    with pytest.raises(MessageError) as excinfo:
        decode_message(payload)
    assert fragment.lower() in str(excinfo.value).lower()


def test_messages_are_frozen() -> None:
    ping = Ping(command_id="x")
    with pytest.raises(ValueError, match="frozen"):
        ping.command_id = "y"  # type: ignore[misc]


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(MessageError) as excinfo:
        decode_message(b" " * (2 * 1024 * 1024))
    assert excinfo.value.reason == "too_large"


def test_schema_is_valid_json_schema_and_covers_every_kind() -> None:
    schema = message_schema()
    Draft202012Validator.check_schema(schema)
    kinds = {
        definition["properties"]["kind"]["const"]
        for definition in schema["$defs"].values()
        if "const" in definition.get("properties", {}).get("kind", {})
    }
    for message_type in MESSAGE_TYPES:
        assert message_type.model_fields["kind"].default in kinds
    validator = Draft202012Validator(schema)
    for message in EXAMPLES:
        validator.validate(json.loads(encode_message(message)))


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
kinds = st.sampled_from([t.model_fields["kind"].default for t in MESSAGE_TYPES])


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_fedge_errors(data: bytes) -> None:
    with contextlib.suppress(FedgeError):
        decode_message(data)


@settings(max_examples=1000, deadline=None)
@given(kinds, st.dictionaries(st.text(max_size=15), json_values, max_size=8))
def test_random_json_with_real_kinds_raises_only_fedge_errors(
    kind: str, body: dict[str, object]
) -> None:
    body["kind"] = kind
    with contextlib.suppress(FedgeError):
        decode_message(json.dumps(body).encode())
