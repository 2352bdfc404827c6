"""Operator-signed commands: an Ed25519 signature over the command, its topic, a time and a nonce.

Off by default: then the broker's ACL decides who may send commands (the operator role and
the coordinator; see README, "Who can send commands"). A fleet that wants proof gives its
agents and coordinator one or more operator public keys (``operator_keys``); from then on
every command on their command topics must come as a :class:`~protocol.signing.SignedMessage`
whose body is an :class:`OperatorCommand`: the command's own JSON text, the topic it is
meant for (so a command signed for one agent is worthless on another), when it was signed
and a random nonce. :class:`CommandGate` opens such envelopes and refuses, each with its
reason:

- ``unsigned_command``: not a signed envelope at all (a plain command, or anything else);
- ``bad_signature``: an unknown key, a signature that does not verify, or one made for
  another topic;
- ``stale_command``: signed too long ago or too far ahead (beyond ``window_s``, which
  allows for clocks a little apart), or a replay: a nonce or a command id already seen
  within the window.

What the gate has seen lives in memory: a restarted daemon forgets it, so the window alone
bounds how long a captured command stays usable there. The same Ed25519 machinery signs the
coordinator's releases (:mod:`protocol.signing`); operator keys are separate key pairs
(``fedge keys generate --name operator``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from pathlib import Path

from protocol.errors import FedgeError, MessageError, SignatureError
from protocol.messages.agent import CommandAck
from protocol.messages.base import Message
from protocol.messages.codec import decode_message, encode_message
from protocol.messages.commands import OperatorCommand
from protocol.signing import SigningKey, VerifyKey, decode_signed, load_verify_key

__all__ = [
    "DEFAULT_COMMAND_WINDOW_S",
    "CommandGate",
    "OperatorCommand",
    "load_command_gate",
    "refusal",
    "sign_command",
]

DEFAULT_COMMAND_WINDOW_S = 300.0
MAX_REMEMBERED = 10_000  # nonces and command ids kept for replay checks
_NONCE_BYTES = 16


def sign_command(
    key: SigningKey, command: Message, *, topic: str, now: float, nonce: str | None = None
) -> bytes:
    """The signed envelope to publish on ``topic`` instead of ``command`` itself."""
    body = OperatorCommand(
        command=encode_message(command).decode("utf-8"),
        topic=topic,
        issued_at=now,
        nonce=nonce or secrets.token_hex(_NONCE_BYTES),
    )
    return encode_message(key.sign(encode_message(body).decode("utf-8")))


class CommandGate:
    """Admits only fresh commands signed by an operator key for the topic they arrive on."""

    def __init__(
        self,
        keys: Sequence[VerifyKey],
        *,
        window_s: float = DEFAULT_COMMAND_WINDOW_S,
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        if not keys:
            raise ValueError("a command gate needs at least one operator key")
        self._keys = {key.key_id: key for key in keys}
        self._window_s = window_s
        self._max_remembered = max_remembered
        # What was admitted, until when a replay of it would still look fresh.
        self._seen: dict[tuple[str, str], float] = {}

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def open(self, topic: str, payload: bytes, now: float) -> bytes:
        """The command's own JSON bytes if ``payload`` passes; else :class:`SignatureError`."""
        try:
            signed = decode_signed(payload)
        except MessageError as exc:
            raise SignatureError(
                "commands here must be signed by an operator key", reason="unsigned_command"
            ) from exc
        key = self._keys.get(signed.key_id)
        if key is None:
            raise SignatureError(
                f"command signed by key {signed.key_id}, not an operator key here",
                reason="bad_signature",
            )
        try:
            body = decode_message(key.verify(signed).encode("utf-8"), OperatorCommand)
        except SignatureError:
            raise
        except FedgeError as exc:
            raise SignatureError(
                f"signed text is not an operator command: {exc}", reason="bad_signature"
            ) from exc
        if body.topic != topic:
            raise SignatureError(
                f"command signed for {body.topic[:200]}, not for {topic}", reason="bad_signature"
            )
        age = now - body.issued_at
        if abs(age) > self._window_s:
            raise SignatureError(
                f"command signed {age:.0f} s ago; only {self._window_s:g} s either way are "
                "accepted (are the clocks set?)",
                reason="stale_command",
            )
        command_id = _command_id(body.command)
        self._seen = {k: until for k, until in self._seen.items() if until >= now}
        if ("nonce", f"{signed.key_id}/{body.nonce}") in self._seen:
            raise SignatureError(
                f"command {command_id!r} replayed (nonce already used)", reason="stale_command"
            )
        if command_id is not None and ("command_id", command_id) in self._seen:
            raise SignatureError(
                f"command id {command_id!r} already used within {self._window_s:g} s",
                reason="stale_command",
            )
        until = body.issued_at + self._window_s
        self._remember(("nonce", f"{signed.key_id}/{body.nonce}"), until)
        if command_id is not None:
            self._remember(("command_id", command_id), until)
        return body.command.encode("utf-8")

    def _remember(self, key: tuple[str, str], until: float) -> None:
        if len(self._seen) >= self._max_remembered:
            # Only operators' commands get here; past the bound, the soonest to expire goes.
            del self._seen[min(self._seen, key=self._seen.__getitem__)]
        self._seen[key] = until


def _command_id(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    found = value.get("command_id") if isinstance(value, dict) else None
    return found if isinstance(found, str) else None


def refusal(payload: bytes, error: FedgeError) -> CommandAck | None:
    """The acknowledgement refusing ``payload``, when its command id can be read at all.

    Read from the plain command, or from inside the envelope without trusting it: the
    answer only tells whoever sent it why nothing was done.
    """
    try:
        signed = decode_signed(payload)
        text = decode_message(signed.body.encode("utf-8"), OperatorCommand).command
    except FedgeError:
        text = payload.decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("command_id"), str):
        return None
    kind = value.get("kind")
    return CommandAck(
        command_id=value["command_id"][:1024],
        command=kind[:1024] if isinstance(kind, str) else "",
        ok=False,
        reason=error.reason,
        message=str(error)[:1024],
    )


def load_command_gate(
    paths: Sequence[Path], *, window_s: float = DEFAULT_COMMAND_WINDOW_S
) -> CommandGate | None:
    """The gate for the configured operator public keys; None (no gate) when there are none."""
    if not paths:
        return None
    return CommandGate([load_verify_key(path) for path in paths], window_s=window_s)
