"""Ed25519 signing: round trips, tampering, unknown keys, key files."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ConfigError, FedgeError, MessageError, SignatureError
from protocol.signing import (
    MAX_SIGNED_BODY_CHARS,
    SignedMessage,
    SigningKey,
    VerifyKey,
    decode_signed,
    load_signing_key,
    load_verify_key,
    write_key_pair,
)

BODY = json.dumps({"kind": "round_announcement", "round": 3, "note": "naïve ✓"})


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey.generate()


def _flip_base64_byte(signature: str, position: int) -> str:
    raw = bytearray(base64.b64decode(signature))
    raw[position] ^= 0x01
    return base64.b64encode(raw).decode()


def test_sign_then_verify_returns_the_exact_body(key: SigningKey) -> None:
    signed = key.sign(BODY)
    assert signed.body == BODY
    assert len(base64.b64decode(signed.signature)) == 64
    assert key.public_key.verify(signed) == BODY


def test_signed_message_round_trips_through_json(key: SigningKey) -> None:
    signed = key.sign(BODY)
    decoded = decode_signed(signed.model_dump_json().encode())
    assert decoded == signed
    assert key.public_key.verify(decoded) == BODY


def test_key_id_is_the_first_eight_bytes_of_the_raw_key_hash(key: SigningKey) -> None:
    pem = key.public_key.to_pem()
    public = serialization.load_pem_public_key(pem)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.public_key.key_id == hashlib.sha256(raw).hexdigest()[:16]
    assert key.sign(BODY).key_id == key.public_key.key_id


def test_flipping_any_body_byte_breaks_the_signature(key: SigningKey) -> None:
    signed = key.sign(BODY)
    body = bytearray(BODY.encode())
    for position in (0, len(body) // 2, len(body) - 1):
        tampered_body = bytearray(body)
        tampered_body[position] ^= 0x01
        tampered = signed.model_copy(update={"body": tampered_body.decode()})
        with pytest.raises(SignatureError) as info:
            key.public_key.verify(tampered)
        assert info.value.reason == "bad_signature"


@pytest.mark.parametrize("position", [0, 31, 32, 63])
def test_flipping_a_signature_byte_breaks_it(key: SigningKey, position: int) -> None:
    signed = key.sign(BODY)
    tampered = SignedMessage(
        key_id=signed.key_id,
        body=signed.body,
        signature=_flip_base64_byte(signed.signature, position),
    )
    with pytest.raises(SignatureError) as info:
        key.public_key.verify(tampered)
    assert info.value.reason == "bad_signature"


def test_other_key_is_unknown(key: SigningKey, other_key: SigningKey) -> None:
    signed = other_key.sign(BODY)
    with pytest.raises(SignatureError) as info:
        key.public_key.verify(signed)
    assert info.value.reason == "unknown_key"


def test_claiming_the_right_key_id_does_not_help(key: SigningKey, other_key: SigningKey) -> None:
    forged = other_key.sign(BODY).model_copy(update={"key_id": key.public_key.key_id})
    with pytest.raises(SignatureError) as info:
        key.public_key.verify(forged)
    assert info.value.reason == "bad_signature"


def test_empty_and_largest_bodies_sign(key: SigningKey) -> None:
    assert key.public_key.verify(key.sign("")) == ""
    largest = "x" * MAX_SIGNED_BODY_CHARS
    signed = decode_signed(key.sign(largest).model_dump_json().encode())
    assert key.public_key.verify(signed) == largest
    with pytest.raises(MessageError):
        key.sign(largest + "x")


def test_pem_round_trips(key: SigningKey) -> None:
    restored = SigningKey.from_pem(key.to_pem())
    assert restored.public_key.key_id == key.public_key.key_id
    assert key.to_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
    verify = VerifyKey.from_pem(key.public_key.to_pem())
    assert verify.key_id == key.public_key.key_id
    assert verify.verify(restored.sign(BODY)) == BODY


def _ec_pems() -> tuple[bytes, bytes]:
    private = ec.generate_private_key(ec.SECP256R1())
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def test_keys_that_are_not_usable_ed25519_pems_are_refused(key: SigningKey) -> None:
    ec_private, ec_public = _ec_pems()
    encrypted = serialization.load_pem_private_key(key.to_pem(), None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    for data in (b"", b"garbage", ec_private, encrypted, key.public_key.to_pem()):
        with pytest.raises(ConfigError):
            SigningKey.from_pem(data)
    for data in (b"", b"garbage", ec_public, key.to_pem()):
        with pytest.raises(ConfigError):
            VerifyKey.from_pem(data)


@pytest.mark.parametrize(
    "changes",
    [
        {"key_id": "ABCDEF0123456789"},
        {"key_id": "abc"},
        {"signature": "A" * 88},  # 66 bytes, not 64
        {"signature": "A" * 85 + "B=="},  # non-canonical padding bits
        {"signature": "A" * 86},
        {"body": 5},
        {"kind": "blob_manifest"},
        {"unexpected": True},
    ],
)
def test_bad_envelopes_are_refused(key: SigningKey, changes: dict[str, object]) -> None:
    fields = json.loads(key.sign(BODY).model_dump_json())
    fields.update(changes)
    with pytest.raises(MessageError):
        decode_signed(json.dumps(fields).encode())


def test_oversized_envelope_is_refused_before_parsing() -> None:
    with pytest.raises(MessageError) as info:
        decode_signed(b" " * (7 * MAX_SIGNED_BODY_CHARS))
    assert info.value.reason == "too_large"


def test_write_key_pair_creates_files_with_tight_modes(tmp_path: Path) -> None:
    private_path, public_path = write_key_pair(tmp_path / "keys", name="coordinator")
    assert private_path == tmp_path / "keys" / "coordinator.key"
    assert public_path == tmp_path / "keys" / "coordinator.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    signing = load_signing_key(private_path)
    verify = load_verify_key(public_path)
    assert verify.key_id == signing.public_key.key_id
    assert verify.verify(signing.sign(BODY)) == BODY
    assert sorted((tmp_path / "keys").iterdir()) == [private_path, public_path]


@pytest.fixture
def strict_umask() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("strict_umask")
def test_public_key_stays_readable_under_a_strict_umask(tmp_path: Path) -> None:
    _, public_path = write_key_pair(tmp_path)
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644


def test_write_key_pair_refuses_to_overwrite(tmp_path: Path) -> None:
    private_path, public_path = write_key_pair(tmp_path)
    before = load_verify_key(public_path).key_id
    with pytest.raises(ConfigError) as info:
        write_key_pair(tmp_path)
    assert info.value.reason == "key_exists"
    private_path.unlink()
    with pytest.raises(ConfigError):
        write_key_pair(tmp_path)  # the public half alone still blocks it
    assert load_verify_key(public_path).key_id == before


def test_write_key_pair_overwrites_when_asked(tmp_path: Path) -> None:
    private_path, public_path = write_key_pair(tmp_path)
    before = load_verify_key(public_path).key_id
    write_key_pair(tmp_path, overwrite=True)
    after = load_verify_key(public_path).key_id
    assert after != before
    assert load_signing_key(private_path).public_key.key_id == after
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fedge.key", "fedge.pub"]


def test_write_key_pair_into_a_file_is_a_config_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    with pytest.raises(ConfigError, match="key directory"):
        write_key_pair(not_a_directory)


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "x" * 65])
def test_write_key_pair_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        write_key_pair(tmp_path, name=name)
    assert list(tmp_path.iterdir()) == []


def test_loading_missing_unreadable_or_foreign_files_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_signing_key(tmp_path / "absent.key")
    assert info.value.reason == "missing_key"
    with pytest.raises(ConfigError) as info:
        load_verify_key(tmp_path)  # a directory
    assert info.value.reason == "unreadable_key"
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("hello")
    for loader in (load_signing_key, load_verify_key):
        with pytest.raises(ConfigError) as info:
            loader(not_a_key)
        assert info.value.reason == "bad_key"
    huge = tmp_path / "huge.pub"
    huge.write_bytes(b"-" * (1024 * 1024))
    with pytest.raises(ConfigError):
        load_verify_key(huge)


def test_group_readable_private_key_is_loaded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private_path, _ = write_key_pair(tmp_path)
    with caplog.at_level(logging.WARNING, logger="protocol.signing"):
        load_signing_key(private_path)
    assert not caplog.records
    private_path.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="protocol.signing"):
        loaded = load_signing_key(private_path)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "group or others" in caplog.records[0].getMessage()
    assert loaded.public_key.key_id == load_verify_key(tmp_path / "fedge.pub").key_id


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_into_decode_signed_raise_only_fedge_errors(data: bytes) -> None:
    try:
        decode_signed(data)
    except FedgeError:
        return


_VERIFY = SigningKey.from_pem(
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MC4CAQAwBQYDK2VwBCIEIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g\n"
    b"-----END PRIVATE KEY-----\n"
).public_key

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=90),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=8,
)
_envelope_values = st.fixed_dictionaries(
    {
        "key_id": st.just(_VERIFY.key_id) | st.binary(min_size=8, max_size=8).map(bytes.hex),
        "body": st.text(max_size=50),
        "signature": st.binary(min_size=64, max_size=64).map(
            lambda raw: base64.b64encode(raw).decode()
        ),
    },
    optional={"kind": st.just("signed") | st.text(max_size=8), "schema_version": _json_values},
)


@settings(max_examples=500, deadline=None)
@given(_json_values | _envelope_values)
def test_random_json_into_decode_signed_and_verify_raise_only_fedge_errors(
    value: object,
) -> None:
    try:
        signed = decode_signed(json.dumps(value).encode())
    except FedgeError:
        return
    with pytest.raises(SignatureError):
        _VERIFY.verify(signed)
