"""The tensor codec: round trips, bounded quantisation error, strict decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import save

from protocol.errors import FedgeError, TensorCodecError
from protocol.tensors import MAX_TENSOR_BYTES, Encoding, decode_tensors, encode_tensors

FORMAT = {"fedge.format": "tensors", "fedge.format_version": "1"}
FLOAT16_EPS = 2.0**-10
FLOAT16_MIN_NORMAL = 2.0**-14


def _shapes_and_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "dense/kernel:0": rng.normal(size=(4, 3)).astype(np.float32),
        "dense/bias:0": rng.normal(size=(3,)).astype(np.float32),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "conv.w-1": rng.normal(size=(3, 3, 1, 8)).astype(np.float32),
    }


def _raw(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    return save(arrays, metadata=metadata)


@pytest.mark.parametrize("encoding", list(Encoding))
def test_round_trip_keeps_names_shapes_and_gives_float32(encoding: Encoding) -> None:
    tensors = _shapes_and_arrays()
    decoded = decode_tensors(encode_tensors(tensors, encoding=encoding))
    assert set(decoded) == set(tensors)
    for name, original in tensors.items():
        assert decoded[name].shape == original.shape
        assert decoded[name].dtype == np.float32
        assert decoded[name].flags.writeable


def test_float32_round_trip_is_bit_exact() -> None:
    tensors = _shapes_and_arrays()
    tensors["signed_zero"] = np.array([-0.0, 0.0, np.finfo(np.float32).tiny / 4], np.float32)
    decoded = decode_tensors(encode_tensors(tensors))
    for name, original in tensors.items():
        assert decoded[name].tobytes() == original.tobytes()


def test_empty_tensor_set_round_trips() -> None:
    for encoding in Encoding:
        assert decode_tensors(encode_tensors({}, encoding=encoding)) == {}


def test_integer_and_float64_inputs_are_stored_as_float32() -> None:
    decoded = decode_tensors(
        encode_tensors({"i": np.arange(6, dtype=np.int64).reshape(2, 3), "d": [0.5, 1.5]})
    )
    np.testing.assert_array_equal(decoded["i"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(decoded["d"], np.array([0.5, 1.5], np.float32))


def test_float16_error_is_bounded_in_normal_range() -> None:
    rng = np.random.default_rng(11)
    magnitudes = 10.0 ** rng.uniform(-4, 4, size=10_000)
    x = (magnitudes * rng.choice([-1.0, 1.0], size=magnitudes.size)).astype(np.float32)
    decoded = decode_tensors(encode_tensors({"x": x}, encoding=Encoding.FLOAT16))["x"]
    assert np.all(np.abs(x) >= FLOAT16_MIN_NORMAL)
    relative = np.abs(decoded.astype(np.float64) - x) / np.abs(x)
    assert float(relative.max()) <= FLOAT16_EPS
    assert float(relative.max()) > 0.0  # it really went through float16


def test_int8_error_is_at_most_half_a_step() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(scale=0.05, size=(64, 32)).astype(np.float32)
    scale = float(np.abs(x).max()) / 127
    payload = encode_tensors({"w": x}, encoding=Encoding.INT8)
    decoded = decode_tensors(payload)["w"]
    assert np.all(np.abs(decoded.astype(np.float64) - x) <= scale / 2 + 1e-7 * scale)
    # The extreme value is represented (almost) exactly: it maps to +-127.
    peak = int(np.argmax(np.abs(x)))
    assert decoded.flat[peak] == pytest.approx(x.flat[peak], rel=1e-6)
    assert len(payload) < x.nbytes / 2  # one byte per value plus a header


def test_int8_of_zeros_decodes_to_zeros() -> None:
    decoded = decode_tensors(
        encode_tensors(
            {"z": np.zeros((3, 3), np.float32), "e": np.zeros(0, np.float32)},
            encoding=Encoding.INT8,
        )
    )
    np.testing.assert_array_equal(decoded["z"], np.zeros((3, 3), np.float32))
    assert decoded["e"].shape == (0,)


def test_encoding_accepts_its_string_value() -> None:
    decoded = decode_tensors(encode_tensors({"a": np.ones(3)}, encoding="float16"))  # type: ignore[arg-type]
    np.testing.assert_array_equal(decoded["a"], np.ones(3, np.float32))


@pytest.mark.parametrize(
    "value",
    [
        np.array([1.0, np.nan], np.float32),
        np.array([np.inf], np.float32),
        np.array([1e300]),  # finite float64, not a finite float32
    ],
)
@pytest.mark.parametrize("encoding", list(Encoding))
def test_non_finite_values_are_refused(value: np.ndarray, encoding: Encoding) -> None:
    with pytest.raises(TensorCodecError) as info:
        encode_tensors({"x": value}, encoding=encoding)
    assert info.value.reason == "non_finite"


def test_values_beyond_float16_range_are_refused_for_float16() -> None:
    with pytest.raises(TensorCodecError, match="float16"):
        encode_tensors({"x": np.array([70000.0], np.float32)}, encoding=Encoding.FLOAT16)


@pytest.mark.parametrize("name", ["", "a" * 129, "has space", "é", "__metadata__", "a*b"])
def test_bad_names_are_refused_on_encode(name: str) -> None:
    with pytest.raises(TensorCodecError) as info:
        encode_tensors({name: np.zeros(1, np.float32)})
    assert info.value.reason == "bad_name"


@pytest.mark.parametrize("value", [np.array([1 + 2j]), np.array(["a"]), np.array([True])])
def test_non_real_dtypes_are_refused(value: np.ndarray) -> None:
    with pytest.raises(TensorCodecError) as info:
        encode_tensors({"x": value})
    assert info.value.reason == "bad_dtype"


def test_payload_over_the_bound_is_refused_before_parsing() -> None:
    payload = encode_tensors({"x": np.zeros(100, np.float32)})
    with pytest.raises(TensorCodecError) as info:
        decode_tensors(payload, max_bytes=len(payload) - 1)
    assert info.value.reason == "too_large"
    assert MAX_TENSOR_BYTES == 256 * 1024 * 1024


def test_plain_safetensors_without_fedge_metadata_is_refused() -> None:
    with pytest.raises(TensorCodecError):
        decode_tensors(_raw({"x": np.zeros(2, np.float32)}, {}))


def test_wrong_format_version_is_refused() -> None:
    metadata = {**FORMAT, "fedge.format_version": "2", "fedge.encoding.x": "float32"}
    with pytest.raises(TensorCodecError) as info:
        decode_tensors(_raw({"x": np.zeros(2, np.float32)}, metadata))
    assert info.value.reason == "bad_version"


X32 = {"x": np.ones(4, np.float32)}
X16 = {"x": np.ones(4, np.float16)}
X8 = {"x": np.ones(4, np.int8)}


@pytest.mark.parametrize(
    ("arrays", "extra"),
    [
        (X32, {}),  # no encoding declared
        (X32, {"fedge.encoding.x": "bfloat16"}),
        (X16, {"fedge.encoding.x": "float32"}),  # dtype does not match the declaration
        (X32, {"fedge.encoding.x": "int8", "fedge.scale.x": "0.1"}),
        (X8, {"fedge.encoding.x": "float16"}),
        (X8, {"fedge.encoding.x": "int8"}),  # missing scale
        (X8, {"fedge.encoding.x": "int8", "fedge.scale.x": "nan"}),
        (X8, {"fedge.encoding.x": "int8", "fedge.scale.x": "inf"}),
        (X8, {"fedge.encoding.x": "int8", "fedge.scale.x": "0"}),
        (X8, {"fedge.encoding.x": "int8", "fedge.scale.x": "-0.5"}),
        (X8, {"fedge.encoding.x": "int8", "fedge.scale.x": "1e300"}),  # overflows float32
        (X8, {"fedge.encoding.x": "int8", "fedge.scale.x": "one"}),
        (X32, {"fedge.encoding.x": "float32", "fedge.scale.x": "1.0"}),  # scale on a float
        (X32, {"fedge.encoding.x": "float32", "fedge.encoding.y": "float32"}),  # ghost tensor
        (X32, {"fedge.encoding.x": "float32", "other": "value"}),
        ({"x": np.ones(2, np.float64)}, {"fedge.encoding.x": "float32"}),
        ({"x": np.array([-128, 5], np.int8)}, {"fedge.encoding.x": "int8", "fedge.scale.x": "1.0"}),
        ({"x": np.array([np.nan], np.float32)}, {"fedge.encoding.x": "float32"}),
        ({"x": np.array([np.inf], np.float16)}, {"fedge.encoding.x": "float16"}),
        ({"bad name": np.ones(1, np.float32)}, {"fedge.encoding.bad name": "float32"}),
    ],
)
def test_bad_metadata_or_contents_are_refused(
    arrays: dict[str, np.ndarray], extra: dict[str, str]
) -> None:
    with pytest.raises(TensorCodecError):
        decode_tensors(_raw(arrays, {**FORMAT, **extra}))


def test_hand_made_int8_payload_decodes_with_its_scale() -> None:
    payload = _raw(
        {"x": np.array([-127, 0, 3, 127], np.int8)},
        {**FORMAT, "fedge.encoding.x": "int8", "fedge.scale.x": "0.5"},
    )
    np.testing.assert_array_equal(
        decode_tensors(payload)["x"], np.array([-63.5, 0.0, 1.5, 63.5], np.float32)
    )


def test_duplicate_keys_in_the_header_are_refused() -> None:
    header = (
        b'{"__metadata__":{"fedge.format":"tensors","fedge.format_version":"1",'
        b'"fedge.encoding.x":"float32"},'
        b'"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]},'
        b'"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}'
    )
    payload = len(header).to_bytes(8, "little") + header + b"\x00\x00\x80?"
    with pytest.raises(TensorCodecError):
        decode_tensors(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00" * 7,
        (10**6).to_bytes(8, "little") + b"{}",
        (2).to_bytes(8, "little") + b"[]",
        (4).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc",
        (10).to_bytes(8, "little") + b"[" * 10,
    ],
)
def test_garbage_is_refused(payload: bytes) -> None:
    with pytest.raises(TensorCodecError):
        decode_tensors(payload)


def test_deeply_nested_header_is_refused() -> None:
    header = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(TensorCodecError):
        decode_tensors(len(header).to_bytes(8, "little") + header)


_finite_float32 = hnp.from_dtype(
    np.dtype(np.float32), allow_nan=False, allow_infinity=False, allow_subnormal=True
)
_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    elements=_finite_float32,
)
_names = st.from_regex(r"[A-Za-z0-9_.:/\-]{1,128}", fullmatch=True).filter(
    lambda name: name != "__metadata__"
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_names, _arrays, max_size=4))
def test_random_float32_arrays_round_trip_exactly(tensors: dict[str, np.ndarray]) -> None:
    decoded = decode_tensors(encode_tensors(tensors))
    assert set(decoded) == set(tensors)
    for name, original in tensors.items():
        assert decoded[name].shape == original.shape
        assert decoded[name].tobytes() == original.tobytes()


@settings(max_examples=300, deadline=None)
@given(_arrays)
def test_random_int8_error_is_bounded(x: np.ndarray) -> None:
    decoded = decode_tensors(encode_tensors({"x": x}, encoding=Encoding.INT8))["x"]
    peak = float(np.abs(x).max()) if x.size else 0.0
    scale = peak / 127 if peak > 0 else 1.0
    error = np.abs(decoded.astype(np.float64) - x.astype(np.float64))
    # Besides half a step, float32 rounding of the decoded value (relative to the peak).
    assert np.all(error <= scale / 2 + peak * 2.0**-23)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_fedge_errors(data: bytes) -> None:
    try:
        decoded = decode_tensors(data)
    except FedgeError:
        return
    assert all(array.dtype == np.float32 for array in decoded.values())


_VALID = encode_tensors(
    {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)},
    encoding=Encoding.INT8,
)


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    st.integers(0, len(_VALID)),
)
def test_mutated_payloads_raise_only_fedge_errors(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_VALID)
    for position, value in edits:
        data[position] = value
    try:
        decoded = decode_tensors(bytes(data[:cut]) if cut < len(data) else bytes(data))
    except FedgeError:
        return
    assert all(array.dtype == np.float32 for array in decoded.values())


def test_header_metadata_is_what_the_docstring_says() -> None:
    payload = encode_tensors({"w": np.array([0.0, 1.27], np.float32)}, encoding=Encoding.INT8)
    length = int.from_bytes(payload[:8], "little")
    metadata = json.loads(payload[8 : 8 + length])["__metadata__"]
    assert metadata["fedge.format"] == "tensors"
    assert metadata["fedge.format_version"] == "1"
    assert metadata["fedge.encoding.w"] == "int8"
    assert float(metadata["fedge.scale.w"]) == pytest.approx(1.27 / 127)
