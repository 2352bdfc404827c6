"""Operator-signed commands: the gate's pure logic (protocol.operator)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import FedgeError, SignatureError
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.commands import OperatorCommand, Ping, StopRounds
from protocol.operator import CommandGate, refusal, sign_command
from protocol.signing import SignedMessage, SigningKey

TOPIC = "fedge/test/agents/pi-1/commands"
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def operator() -> SigningKey:
    return SigningKey.generate()


def _gate(operator: SigningKey, window_s: float = 300.0) -> CommandGate:
    return CommandGate([operator.public_key], window_s=window_s)


def _reason(gate: CommandGate, payload: bytes, *, topic: str = TOPIC, now: float = NOW) -> str:
    with pytest.raises(SignatureError) as caught:
        gate.open(topic, payload, now)
    return caught.value.reason


def test_a_signed_command_opens_to_the_command_itself(operator: SigningKey) -> None:
    command = StopRounds(command_id="s-1", reason="maintenance", requested_by="ops@hub")
    payload = sign_command(operator, command, topic=TOPIC, now=NOW)
    opened = _gate(operator).open(TOPIC, payload, NOW + 10.0)
    assert decode_message(opened, StopRounds) == command


def test_unsigned_forged_misdirected_stale_and_replayed_commands_are_refused(
    operator: SigningKey,
) -> None:
    gate = _gate(operator)
    ping = Ping(command_id="p-1")
    assert _reason(gate, encode_message(ping)) == "unsigned_command"
    assert _reason(gate, b"\xff garbage") == "unsigned_command"
    stranger = SigningKey.generate()
    assert _reason(gate, sign_command(stranger, ping, topic=TOPIC, now=NOW)) == "bad_signature"
    # Tampered: the operator's signature over a text that was changed afterwards.
    signed = decode_message(sign_command(operator, ping, topic=TOPIC, now=NOW), SignedMessage)
    tampered = signed.model_copy(update={"body": signed.body.replace("p-1", "p-2")})
    assert _reason(gate, encode_message(tampered)) == "bad_signature"
    # Signed for another agent's topic: worthless here.
    elsewhere = sign_command(operator, ping, topic="fedge/test/agents/pi-2/commands", now=NOW)
    assert _reason(gate, elsewhere) == "bad_signature"
    assert _reason(gate, sign_command(operator, ping, topic=TOPIC, now=NOW - 301.0)) == (
        "stale_command"
    )
    assert _reason(gate, sign_command(operator, ping, topic=TOPIC, now=NOW + 301.0)) == (
        "stale_command"
    )
    fresh = sign_command(operator, ping, topic=TOPIC, now=NOW)
    gate.open(TOPIC, fresh, NOW)
    assert _reason(gate, fresh, now=NOW + 1.0) == "stale_command"  # the same envelope again
    # A new nonce, the same command id: a replay of the command under a new envelope.
    again = sign_command(operator, ping, topic=TOPIC, now=NOW + 2.0)
    assert _reason(gate, again, now=NOW + 2.0) == "stale_command"
    # Nothing refused was remembered: a fresh command still goes through.
    gate.open(TOPIC, sign_command(operator, Ping(command_id="p-2"), topic=TOPIC, now=NOW), NOW)


def test_a_command_id_may_come_back_once_its_window_has_passed(operator: SigningKey) -> None:
    gate = _gate(operator, window_s=60.0)
    ping = Ping(command_id="p-1")
    gate.open(TOPIC, sign_command(operator, ping, topic=TOPIC, now=NOW), NOW)
    later = NOW + 120.0
    gate.open(TOPIC, sign_command(operator, ping, topic=TOPIC, now=later), later)


def test_a_command_signed_ahead_of_the_clock_is_remembered_until_it_goes_stale(
    operator: SigningKey,
) -> None:
    gate = _gate(operator, window_s=60.0)
    ahead = sign_command(operator, Ping(command_id="p-1"), topic=TOPIC, now=NOW + 50.0)
    gate.open(TOPIC, ahead, NOW)
    assert _reason(gate, ahead, now=NOW + 100.0) == "stale_command"  # still fresh: a replay


def test_the_gate_remembers_a_bounded_number_of_commands(operator: SigningKey) -> None:
    gate = CommandGate([operator.public_key], max_remembered=3)
    for index in range(10):
        command = Ping(command_id=f"p-{index}")
        gate.open(TOPIC, sign_command(operator, command, topic=TOPIC, now=NOW), NOW)
    assert len(gate._seen) <= 3


def test_any_of_several_operator_keys_may_sign(operator: SigningKey) -> None:
    other = SigningKey.generate()
    gate = CommandGate([operator.public_key, other.public_key])
    assert set(gate.key_ids) == {operator.public_key.key_id, other.public_key.key_id}
    gate.open(TOPIC, sign_command(other, Ping(command_id="o-1"), topic=TOPIC, now=NOW), NOW)


def test_a_refusal_names_the_command_it_refuses(operator: SigningKey) -> None:
    error = SignatureError("no", reason="unsigned_command")
    plain = refusal(encode_message(Ping(command_id="p-9")), error)
    assert plain is not None
    assert (plain.command_id, plain.command, plain.ok, plain.reason) == (
        "p-9",
        "ping",
        False,
        "unsigned_command",
    )
    signed = refusal(sign_command(operator, Ping(command_id="p-8"), topic=TOPIC, now=NOW), error)
    assert signed is not None
    assert signed.command_id == "p-8"
    assert refusal(b"\x00\x01", error) is None
    assert refusal(json.dumps({"command_id": 5}).encode(), error) is None


def test_the_signed_body_is_an_operator_command(operator: SigningKey) -> None:
    payload = sign_command(operator, Ping(command_id="p-1"), topic=TOPIC, now=NOW, nonce="ab" * 8)
    body = decode_message(decode_message(payload, SignedMessage).body, OperatorCommand)
    assert (body.topic, body.issued_at, body.nonce) == (TOPIC, NOW, "ab" * 8)
    assert decode_message(body.command, Ping).command_id == "p-1"


@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_with_a_reason_never_a_crash(payload: bytes) -> None:
    gate = CommandGate([SigningKey.generate().public_key])
    with pytest.raises(FedgeError) as caught:
        gate.open(TOPIC, payload, NOW)
    assert caught.value.reason in {"unsigned_command", "bad_signature", "stale_command"}
    refusal(payload, SignatureError("no", reason="unsigned_command"))  # never raises
