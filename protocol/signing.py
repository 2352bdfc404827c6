"""Ed25519 signatures over message text, and the key files that hold the keys.

The coordinator signs the exact JSON text of a message (a model bundle manifest, a round
announcement) and sends a :class:`SignedMessage` around it; an agent holds only the public
key and gets the text back from :meth:`VerifyKey.verify` only if the signature holds. Keys
are named on the wire by a ``key_id``: the first 8 bytes of the sha256 of the raw 32-byte
public key, in hex.

Key files are PEM: PKCS8 for the private key (mode 0600), SubjectPublicKeyInfo for the
public one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import Field, ValidationError

from protocol.errors import ConfigError, MessageError, SignatureError
from protocol.messages.base import Message

__all__ = [
    "MAX_SIGNED_BODY_CHARS",
    "MAX_SIGNED_MESSAGE_BYTES",
    "SignedMessage",
    "SigningKey",
    "VerifyKey",
    "decode_signed",
    "load_signing_key",
    "load_verify_key",
    "write_key_pair",
]

logger = logging.getLogger(__name__)

MAX_SIGNED_BODY_CHARS = 1024 * 1024
# A body character takes at most 6 bytes once escaped inside the envelope's JSON (\uXXXX).
MAX_SIGNED_MESSAGE_BYTES = 6 * MAX_SIGNED_BODY_CHARS + 4096
_MAX_KEY_FILE_BYTES = 64 * 1024
_PRIVATE_KEY_FILE_MODE = 0o600
_PUBLIC_KEY_FILE_MODE = 0o644
_KEY_ID_BYTES = 8
_KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class SignedMessage(Message):
    """A message's exact JSON text with an Ed25519 signature over its UTF-8 bytes."""

    kind: Literal["signed"] = "signed"
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    body: Annotated[str, Field(max_length=MAX_SIGNED_BODY_CHARS)]
    # Canonical base64 of exactly 64 bytes: the last character before "==" holds 2 bits.
    signature: Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{85}[AQgw]==$")]


class VerifyKey:
    """An Ed25519 public key that checks :class:`SignedMessage` envelopes."""

    __slots__ = ("_key", "_key_id")

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._key_id = hashlib.sha256(raw).digest()[:_KEY_ID_BYTES].hex()

    @classmethod
    def from_pem(cls, data: bytes) -> VerifyKey:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"not a PEM public key: {exc}", reason="bad_key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("public key is not an Ed25519 key", reason="bad_key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_id(self) -> str:
        return self._key_id

    def verify(self, signed: SignedMessage) -> str:
        """Return the signed body, or raise :class:`SignatureError`."""
        if signed.key_id != self._key_id:
            raise SignatureError(
                f"message signed by unknown key {signed.key_id}", reason="unknown_key"
            )
        try:
            signature = base64.b64decode(signed.signature, validate=True)
            self._key.verify(signature, signed.body.encode("utf-8"))
        except (binascii.Error, InvalidSignature) as exc:
            raise SignatureError(
                f"signature by key {signed.key_id} does not verify", reason="bad_signature"
            ) from exc
        return signed.body


class SigningKey:
    """An Ed25519 private key that signs message text."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(
                f"not an unencrypted PEM private key: {exc}", reason="bad_key"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("private key is not an Ed25519 key", reason="bad_key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> VerifyKey:
        return VerifyKey(self._key.public_key())

    def sign(self, body: str) -> SignedMessage:
        if len(body) > MAX_SIGNED_BODY_CHARS:
            raise MessageError(
                f"body of {len(body)} characters exceeds {MAX_SIGNED_BODY_CHARS}",
                reason="too_large",
            )
        signature = self._key.sign(body.encode("utf-8"))
        return SignedMessage(
            key_id=self.public_key.key_id,
            body=body,
            signature=base64.b64encode(signature).decode("ascii"),
        )


def decode_signed(data: bytes) -> SignedMessage:
    """Decode a signed envelope's JSON (without verifying it); raises MessageError."""
    if len(data) > MAX_SIGNED_MESSAGE_BYTES:
        raise MessageError(
            f"signed message of {len(data)} bytes exceeds {MAX_SIGNED_MESSAGE_BYTES}",
            reason="too_large",
        )
    try:
        return SignedMessage.model_validate_json(data)
    except ValidationError as exc:
        raise MessageError(f"not a signed message: {exc}") from exc


def write_key_pair(
    directory: Path, *, name: str = "fedge", overwrite: bool = False
) -> tuple[Path, Path]:
    """Generate a key pair into ``<name>.key`` (0600) and ``<name>.pub`` (0644)."""
    if not _KEY_NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"bad key name {name!r}", reason="bad_key_name")
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    if not overwrite:
        existing = [str(path) for path in (private_path, public_path) if path.exists()]
        if existing:
            raise ConfigError(
                f"refusing to overwrite existing key files {existing}", reason="key_exists"
            )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create key directory {directory}: {exc}") from exc
    key = SigningKey.generate()
    try:
        _write_file(private_path, key.to_pem(), mode=_PRIVATE_KEY_FILE_MODE, overwrite=overwrite)
        _write_file(
            public_path, key.public_key.to_pem(), mode=_PUBLIC_KEY_FILE_MODE, overwrite=overwrite
        )
    except FileExistsError as exc:
        raise ConfigError(f"key file {exc.filename} already exists", reason="key_exists") from exc
    except OSError as exc:
        raise ConfigError(f"cannot write key files in {directory}: {exc}") from exc
    logger.info("wrote key pair %s (key id %s)", private_path, key.public_key.key_id)
    return private_path, public_path


def load_signing_key(path: Path) -> SigningKey:
    """Load a private key file, warning if others than its owner may read it."""
    data, mode = _read_key_file(path)
    if mode & 0o077:
        logger.warning(
            "private key %s is accessible by group or others (mode %o); chmod 600 it",
            path,
            mode & 0o777,
        )
    return SigningKey.from_pem(data)


def load_verify_key(path: Path) -> VerifyKey:
    data, _ = _read_key_file(path)
    return VerifyKey.from_pem(data)


def _read_key_file(path: Path) -> tuple[bytes, int]:
    """The file's bytes and its mode bits."""
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"key file {path} does not exist", reason="missing_key") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}", reason="unreadable_key") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{path} is too large to be a key file", reason="bad_key")
    return data, mode


def _write_file(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` with ``mode`` from the moment the file exists.

    Without ``overwrite`` the file is created exclusively; with it, a temporary file is
    renamed over the old one, so a reader never sees a half-written key.
    """
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if overwrite else path
    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            # The umask may have narrowed the mode; a public key must stay world-readable.
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        # The file is ours (created exclusively): never leave a half-written key behind.
        target.unlink(missing_ok=True)
        raise
    if overwrite:
        os.replace(target, path)
