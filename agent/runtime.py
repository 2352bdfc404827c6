"""One inference runtime over LiteRT, tflite-runtime and TensorFlow Lite.

:func:`load_interpreter_class` picks the interpreter: ``ai_edge_litert`` first, then
``tflite_runtime``, then ``tensorflow.lite`` (TensorFlow is imported only in that last
case). :class:`TfliteModel` wraps exactly one model in one interpreter and speaks float32
on both sides: it quantises inputs and dequantises outputs from the tensors' own
parameters, so callers never see int8/uint8.

Batches: a model whose input has a dynamic batch dimension (``shape_signature[0] == -1``,
what Keras exports) runs a whole batch in one invoke, resizing the input when the batch
size changes; a model with a fixed batch runs a larger batch one slice at a time.

Threads: an interpreter is not re-entrant, so every :meth:`TfliteModel.predict` holds the
model's lock. Concurrent callers are serialised; for parallel inference create one
:class:`TfliteModel` per thread.

Output order: when the model carries exactly one serving signature, outputs come sorted by
that signature's output names in natural order (``output_2`` before ``output_10``; for Keras
models this is the Keras output order, which the interpreter's own order is not); otherwise
in the interpreter's order.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import logging
import os
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from protocol.errors import ConfigError, ModelError

__all__ = [
    "RUNTIME_NAMES",
    "Runtime",
    "TensorInfo",
    "TfliteModel",
    "load_interpreter_class",
    "load_labels",
]

_log = logging.getLogger(__name__)

# (name, module to import, attribute path of the interpreter class, distribution that
# reports the version), in order of preference. ``tf.lite`` exists only as an attribute.
_CANDIDATES: Final = (
    ("litert", "ai_edge_litert.interpreter", "Interpreter", "ai-edge-litert"),
    ("tflite_runtime", "tflite_runtime.interpreter", "Interpreter", "tflite-runtime"),
    ("tensorflow", "tensorflow", "lite.Interpreter", "tensorflow"),
)
RUNTIME_NAMES: Final = tuple(c[0] for c in _CANDIDATES)
# tensorflow.lite.Interpreter warns on every construction that it is deprecated in favour of
# LiteRT; choosing it is already a deliberate fallback, logged once when it is picked.
_TF_DEPRECATION_WARNING = r"(?s).*tf\.lite\.Interpreter is deprecated"
_QUANTIZED_DTYPES: Final = {"int8": np.int8, "uint8": np.uint8}
_SUPPORTED_INPUT_DTYPES: Final = frozenset({"float32", *_QUANTIZED_DTYPES})
_MAX_MODEL_BYTES: Final = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Runtime:
    """The interpreter implementation in use."""

    name: str
    version: str
    interpreter_class: type[Any]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One input or output tensor as the model declares it (batch dimension included).

    ``scale`` is 0.0 for tensors that are not quantised.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.dtype in _QUANTIZED_DTYPES and self.scale != 0.0


def _version(distribution: str, module: Any) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


def _import_runtime(name: str, module_name: str, attribute: str, distribution: str) -> Runtime:
    if name == "tensorflow":
        # Only the fallback imports TensorFlow; keep its C++ INFO/WARNING lines quiet.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    found: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError as exc:
            raise ImportError(f"{module_name} has no {attribute}") from exc
    root = importlib.import_module(module_name.partition(".")[0])
    return Runtime(name, _version(distribution, root), found)


@functools.cache
def load_interpreter_class(preferred: str | None = None) -> Runtime:
    """The first interpreter that imports, or exactly ``preferred`` (one of RUNTIME_NAMES).

    The choice is made once per ``preferred`` value and remembered; a failure is not.
    """
    if preferred is not None and preferred not in RUNTIME_NAMES:
        raise ConfigError(
            f"unknown runtime {preferred!r}; choose one of {', '.join(RUNTIME_NAMES)}",
            reason="bad_runtime",
        )
    candidates = [c for c in _CANDIDATES if preferred is None or c[0] == preferred]
    failures: list[str] = []
    for name, module_name, attribute, distribution in candidates:
        try:
            runtime = _import_runtime(name, module_name, attribute, distribution)
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
            continue
        if name == "tensorflow":
            _log.warning("using TensorFlow's deprecated tf.lite interpreter; install LiteRT")
        _log.info("inference runtime %s %s", runtime.name, runtime.version)
        return runtime
    raise ModelError(
        "no TFLite runtime can be imported (" + "; ".join(failures) + ")", reason="no_runtime"
    )


def _tensor_info(detail: Mapping[str, Any]) -> TensorInfo:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorInfo(
        name=str(detail["name"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    # output_10 after output_2
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _signature_output_order(interpreter: Any, outputs: Sequence[Mapping[str, Any]]) -> list[int]:
    """Tensor indices of the outputs, in the serving signature's order when there is one."""
    indices = [int(d["index"]) for d in outputs]
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        return indices
    # The runner pins tensor buffers while it lives; drop it before any resize.
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    by_name = runner.get_output_details()
    ordered = [int(by_name[n]["index"]) for n in sorted(by_name, key=_natural_key)]
    del runner
    return ordered if sorted(ordered) == sorted(indices) else indices


class TfliteModel:
    """One ``.tflite`` model in one interpreter, float32 in and float32 out."""

    def __init__(self, interpreter: Any, runtime: Runtime, content: bytes) -> None:
        """Use :meth:`from_bytes` or :meth:`from_path`."""
        self._interpreter = interpreter
        self._runtime = runtime
        # The interpreter reads the flatbuffer in place: it must outlive the interpreter.
        self._content = content
        self._lock = threading.Lock()
        inputs = interpreter.get_input_details()
        if len(inputs) != 1:
            raise ModelError(
                f"only single-input models are supported, this one has {len(inputs)} inputs",
                reason="unsupported_model",
            )
        self._input_detail = inputs[0]
        self._input = _tensor_info(inputs[0])
        if self._input.dtype not in _SUPPORTED_INPUT_DTYPES:
            raise ModelError(
                f"input dtype {self._input.dtype} is not supported "
                f"(supported: {', '.join(sorted(_SUPPORTED_INPUT_DTYPES))})",
                reason="unsupported_model",
            )
        signature = self._input_detail.get("shape_signature")
        self._dynamic_batch = signature is not None and len(signature) > 0 and signature[0] == -1
        self._batch = self._input.shape[0] if self._input.shape else 1
        outputs = {int(d["index"]): d for d in interpreter.get_output_details()}
        self._output_indices = _signature_output_order(interpreter, list(outputs.values()))
        self._outputs = tuple(_tensor_info(outputs[i]) for i in self._output_indices)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, num_threads: int = 1, runtime: str | None = None
    ) -> TfliteModel:
        """Load a model from its flatbuffer bytes with ``num_threads`` CPU threads."""
        if num_threads < 1:
            raise ConfigError(f"num_threads must be at least 1, got {num_threads}")
        if not data:
            raise ModelError("the model is empty", reason="bad_model")
        if len(data) > _MAX_MODEL_BYTES:
            raise ModelError(f"the model is too large ({len(data)} bytes)", reason="bad_model")
        rt = load_interpreter_class(runtime)
        content = bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_TF_DEPRECATION_WARNING)
                interpreter = rt.interpreter_class(model_content=content, num_threads=num_threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"not a usable TFLite model: {exc}", reason="bad_model") from exc
        return cls(interpreter, rt, content)

    @classmethod
    def from_path(
        cls, path: str | Path, *, num_threads: int = 1, runtime: str | None = None
    ) -> TfliteModel:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ModelError(f"cannot read model {path}: {exc}", reason="bad_model") from exc
        return cls.from_bytes(data, num_threads=num_threads, runtime=runtime)

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @property
    def input_details(self) -> TensorInfo:
        """The single input, with its batch dimension as loaded (usually 1)."""
        return self._input

    @property
    def output_details(self) -> tuple[TensorInfo, ...]:
        """Every output, in the order :meth:`predict` returns them."""
        return self._outputs

    @property
    def size_bytes(self) -> int:
        return len(self._content)

    @functools.cached_property
    def sha256(self) -> str:
        """The model file's sha256: which release blob (or file) is being served."""
        return hashlib.sha256(self._content).hexdigest()

    def op_output_positions(self, op_name: str) -> tuple[int, ...] | None:
        """Where the outputs of the model's ``op_name`` op sit in :meth:`predict`'s order.

        None when no such op produces model outputs, or the interpreter cannot list its ops
        (the listing is a private interpreter API, so it is only ever a hint).
        """
        list_ops = getattr(self._interpreter, "_get_ops_details", None)
        if list_ops is None:
            return None
        with self._lock:
            try:
                ops = list_ops()
            except (ValueError, RuntimeError):
                return None
        for op in ops:
            if op.get("op_name") != op_name:
                continue
            produced = [int(i) for i in op.get("outputs", ())]
            if all(i in self._output_indices for i in produced):
                return tuple(self._output_indices.index(i) for i in produced)
        return None

    def predict(self, batch: npt.ArrayLike) -> list[npt.NDArray[np.float32]]:
        """Run the model on preprocessed float input, with or without the batch dimension.

        Returns every output as float32 with a leading batch dimension equal to the input's.
        """
        x = self._as_batch(batch)
        with self._lock:
            if self._dynamic_batch or len(x) == self._batch:
                return self._invoke(x)
            pieces = [self._invoke(x[i : i + self._batch]) for i in range(0, len(x), self._batch)]
        return [np.concatenate(parts, axis=0) for parts in zip(*pieces, strict=True)]

    def _as_batch(self, batch: npt.ArrayLike) -> npt.NDArray[np.float32]:
        try:
            x = np.asarray(batch, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"input is not numeric: {exc}", reason="bad_input") from exc
        sample_shape = self._input.shape[1:]
        if x.shape == sample_shape:
            x = x[np.newaxis]
        if x.shape[1:] != sample_shape or len(x) == 0:
            raise ModelError(
                f"input shape {x.shape} does not fit the model's input "
                f"(n, {', '.join(str(d) for d in sample_shape)})",
                reason="bad_input_shape",
            )
        if not self._dynamic_batch and len(x) % self._batch:
            raise ModelError(
                f"batch of {len(x)} is not a multiple of the model's fixed batch {self._batch}",
                reason="bad_input_shape",
            )
        return x

    def _quantize(self, x: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        info = self._input
        target = _QUANTIZED_DTYPES.get(info.dtype)
        if target is None:
            return x
        limits = np.iinfo(target)
        # Without quantisation parameters an integer input takes the values as they are.
        q = np.rint(x / info.scale + info.zero_point) if info.quantized else np.rint(x)
        return np.clip(q, limits.min, limits.max).astype(target)

    def _invoke(self, x: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        interp = self._interpreter
        index = int(self._input_detail["index"])
        try:
            if self._dynamic_batch and len(x) != self._batch:
                interp.resize_tensor_input(index, list(x.shape))
                interp.allocate_tensors()
                self._batch = len(x)
            interp.set_tensor(index, self._quantize(x))
            interp.invoke()
            raw = [interp.get_tensor(i) for i in self._output_indices]
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"inference failed: {exc}", reason="invoke_failed") from exc
        return [_dequantize(r, info) for r, info in zip(raw, self._outputs, strict=True)]


def _dequantize(raw: npt.NDArray[Any], info: TensorInfo) -> npt.NDArray[np.float32]:
    values = np.asarray(raw, dtype=np.float32)
    if info.quantized:
        values = (values - np.float32(info.zero_point)) * np.float32(info.scale)
    return values


def load_labels(path: str | Path) -> tuple[str, ...]:
    """Class labels, one per line in output order; blank lines and surrounding spaces ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read labels {path}: {exc}", reason="bad_labels") from exc
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise ModelError(f"labels file {path} holds no labels", reason="bad_labels")
    return labels
