"""Tensor codec: named numpy arrays to bytes and back, in the safetensors format.

Every tensor travels with its own encoding, recorded in the safetensors metadata next to a
format marker::

    fedge.format          "tensors"
    fedge.format_version  "1"
    fedge.encoding.<name> "float32" | "float16" | "int8"
    fedge.scale.<name>    "<float>"            (int8 only)

int8 is symmetric per tensor: ``scale = max|x| / 127`` (1.0 for an all-zero tensor),
``q = clip(round(x / scale), -127, 127)``, decoded as ``q * scale``. Decoding always gives
float32 arrays, whatever the encoding. Nothing here pickles, and decoding checks every
field of the metadata, because these bytes come from the network.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors
from safetensors import SafetensorError
from safetensors.numpy import save

from protocol.errors import TensorCodecError

__all__ = ["MAX_TENSOR_BYTES", "Encoding", "decode_tensors", "encode_tensors"]

MAX_TENSOR_BYTES = 256 * 1024 * 1024

_FORMAT_KEY = "fedge.format"
_FORMAT = "tensors"
_VERSION_KEY = "fedge.format_version"
_VERSION = "1"
_ENCODING_PREFIX = "fedge.encoding."
_SCALE_PREFIX = "fedge.scale."
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:/\-]{1,128}")
# safetensors keeps its metadata under this key in the same JSON object as the tensors.
_RESERVED_NAME = "__metadata__"
_HEADER_LENGTH_BYTES = 8
_INT8_LIMIT = 127
# The largest scale whose dequantised values all stay finite in float32.
_MAX_INT8_SCALE = float(np.finfo(np.float32).max) / _INT8_LIMIT

FloatArray = npt.NDArray[np.float32]

# safetensors ships no annotations; this is the shape of what it returns.
_deserialize: Callable[[bytes], list[tuple[str, dict[str, Any]]]] = safetensors.deserialize


class Encoding(StrEnum):
    """How one tensor's values are stored on the wire."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"


_WIRE_DTYPES: dict[Encoding, tuple[str, type[np.generic]]] = {
    Encoding.FLOAT32: ("F32", np.float32),
    Encoding.FLOAT16: ("F16", np.float16),
    Encoding.INT8: ("I8", np.int8),
}


def encode_tensors(
    tensors: Mapping[str, npt.ArrayLike], *, encoding: Encoding = Encoding.FLOAT32
) -> bytes:
    """Encode named real-valued arrays; refuses bad names and non-finite values."""
    encoding = Encoding(encoding)
    arrays: dict[str, np.ndarray[Any, np.dtype[Any]]] = {}
    metadata = {_FORMAT_KEY: _FORMAT, _VERSION_KEY: _VERSION}
    for name, value in tensors.items():
        _check_name(name)
        values = _as_finite_float32(name, value)
        metadata[_ENCODING_PREFIX + name] = encoding.value
        if encoding is Encoding.INT8:
            quantised, scale = _quantise(values)
            arrays[name] = quantised
            metadata[_SCALE_PREFIX + name] = repr(scale)
        elif encoding is Encoding.FLOAT16:
            arrays[name] = _to_float16(name, values)
        else:
            arrays[name] = values
    try:
        return save(arrays, metadata=metadata)
    except (SafetensorError, ValueError) as exc:
        raise TensorCodecError(f"cannot encode tensors: {exc}", reason="encode") from exc


def decode_tensors(data: bytes, *, max_bytes: int = MAX_TENSOR_BYTES) -> dict[str, FloatArray]:
    """Decode bytes made by :func:`encode_tensors` into float32 arrays."""
    if len(data) > max_bytes:
        raise TensorCodecError(
            f"tensor payload of {len(data)} bytes exceeds {max_bytes}", reason="too_large"
        )
    metadata = _read_metadata(data)
    try:
        views = _deserialize(data)
    except SafetensorError as exc:
        raise TensorCodecError(f"not a safetensors payload: {exc}") from exc
    result: dict[str, FloatArray] = {}
    for name, view in views:
        _check_name(name)
        encoding = _declared_encoding(metadata, name)
        wire_dtype, np_dtype = _WIRE_DTYPES[encoding]
        if view["dtype"] != wire_dtype:
            raise TensorCodecError(
                f"tensor {name!r} declared {encoding} but stored as {view['dtype']}",
                reason="dtype_mismatch",
            )
        try:
            stored = np.frombuffer(view["data"], dtype=np_dtype).reshape(view["shape"])
        except ValueError as exc:
            raise TensorCodecError(f"tensor {name!r} has a bad shape: {exc}") from exc
        if encoding is Encoding.INT8:
            result[name] = _dequantise(name, stored, _declared_scale(metadata, name))
        else:
            result[name] = _finite_float32(name, stored)
    _check_no_extra_metadata(metadata, set(result))
    return result


def _check_name(name: object) -> None:
    if not isinstance(name, str) or name == _RESERVED_NAME or not _NAME_PATTERN.fullmatch(name):
        raise TensorCodecError(f"bad tensor name {name!r}", reason="bad_name")


def _as_finite_float32(name: str, value: npt.ArrayLike) -> FloatArray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TensorCodecError(
            f"tensor {name!r} has unsupported dtype {array.dtype}", reason="bad_dtype"
        )
    # Overflow to inf is reported below as non-finite, so numpy's own warning is redundant.
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(np.float32, order="C")
    if not np.all(np.isfinite(converted)):
        raise TensorCodecError(
            f"tensor {name!r} has values that are not finite float32", reason="non_finite"
        )
    return converted


def _to_float16(name: str, values: FloatArray) -> np.ndarray[Any, np.dtype[np.float16]]:
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    if not np.all(np.isfinite(half)):
        raise TensorCodecError(f"tensor {name!r} exceeds the float16 range", reason="non_finite")
    return half


def _quantise(values: FloatArray) -> tuple[np.ndarray[Any, np.dtype[np.int8]], float]:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = peak / _INT8_LIMIT if peak > 0.0 else 1.0
    scaled = np.rint(values.astype(np.float64) / scale)
    # Arithmetic on a 0-d array gives a numpy scalar; safetensors needs an array.
    quantised = np.asarray(np.clip(scaled, -_INT8_LIMIT, _INT8_LIMIT), dtype=np.int8)
    return quantised, scale


def _dequantise(name: str, stored: np.ndarray[Any, np.dtype[Any]], scale: float) -> FloatArray:
    if stored.size and int(np.min(stored)) < -_INT8_LIMIT:
        raise TensorCodecError(f"tensor {name!r} holds -128, outside the int8 encoding")
    return np.asarray(stored.astype(np.float64) * scale, dtype=np.float32)


def _finite_float32(name: str, stored: np.ndarray[Any, np.dtype[Any]]) -> FloatArray:
    if not np.all(np.isfinite(stored)):
        raise TensorCodecError(f"tensor {name!r} holds non-finite values", reason="non_finite")
    return stored.astype(np.float32)


def _read_metadata(data: bytes) -> dict[str, str]:
    """Parse the safetensors header ourselves: ``safetensors.numpy.load`` drops metadata."""
    if len(data) < _HEADER_LENGTH_BYTES:
        raise TensorCodecError("tensor payload shorter than its header length")
    header_bytes = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    if header_bytes > len(data) - _HEADER_LENGTH_BYTES:
        raise TensorCodecError("tensor header runs past the end of the payload")
    header_text = data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + header_bytes]
    try:
        header = json.loads(header_text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise TensorCodecError(f"tensor header is not JSON: {exc}") from exc
    metadata = header.get(_RESERVED_NAME) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise TensorCodecError("tensor header lacks fedge metadata", reason="bad_metadata")
    if metadata.get(_FORMAT_KEY) != _FORMAT or metadata.get(_VERSION_KEY) != _VERSION:
        raise TensorCodecError(
            "tensor payload is not in fedge's tensor format, version 1", reason="bad_version"
        )
    return metadata


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in tensor header")
    return result


def _declared_encoding(metadata: Mapping[str, str], name: str) -> Encoding:
    declared = metadata.get(_ENCODING_PREFIX + name, "")
    try:
        return Encoding(declared)
    except ValueError as exc:
        raise TensorCodecError(
            f"tensor {name!r} has unknown encoding {declared!r}", reason="bad_metadata"
        ) from exc


def _declared_scale(metadata: Mapping[str, str], name: str) -> float:
    text = metadata.get(_SCALE_PREFIX + name)
    try:
        scale = float(text) if text is not None else math.nan
    except ValueError as exc:
        raise TensorCodecError(f"tensor {name!r} has a bad scale", reason="bad_metadata") from exc
    if not (math.isfinite(scale) and 0.0 < scale <= _MAX_INT8_SCALE):
        raise TensorCodecError(
            f"tensor {name!r} has a missing or out-of-range scale {text!r}",
            reason="bad_metadata",
        )
    return scale


def _check_no_extra_metadata(metadata: Mapping[str, str], names: set[str]) -> None:
    expected = {_FORMAT_KEY, _VERSION_KEY}
    for name in names:
        expected.add(_ENCODING_PREFIX + name)
        if metadata[_ENCODING_PREFIX + name] == Encoding.INT8:
            expected.add(_SCALE_PREFIX + name)
    extra = sorted(set(metadata) - expected)
    if extra:
        raise TensorCodecError(f"unexpected tensor metadata keys {extra}", reason="bad_metadata")
