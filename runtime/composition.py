"""One serving ``.tflite`` from a frozen backbone and Dense heads, composed at the flatbuffer level.

A transfer task's backbone may be any third-party ``.tflite``: nobody can rebuild it in Keras.
So the serving model is made by editing the backbone's own flatbuffer, through the TFLite
schema's object API that LiteRT ships (``ai_edge_litert.schema_py_generated``, read and
written by ``ai_edge_litert.tools.flatbuffer_utils``): the backbone's operators, tensors and
buffers stay as they are, and after its output come

- ``DEQUANTIZE`` when the backbone's output is int8/uint8 (an int8 backbone; the head is float),
- ``MEAN`` over the two spatial axes when the output is a feature map (n, h, w, k),
- ``CONCATENATION`` of those features, in output order, when the backbone has several
  outputs (a third-party model often does: a landmark model's coordinates and scores),
- per head, one ``FULLY_CONNECTED`` per Dense layer (relu fused into the hidden ones; TFLite
  keeps the kernel as (out, in), Keras as (in, out)) and a ``SOFTMAX``.

One invoke then gives every head's probabilities, each an output of its own, named after its
head. Several heads over one backbone is model merging for tasks that share a backbone
(:func:`runtime.merging.merge_models`): the backbone runs once per frame instead of once per task.

A composed model records, in a metadata entry of its own (:data:`RECORD_NAME`), the sha256 of
the backbone's bytes, how many of its operators, tensors and buffers are the backbone's, and
each head's name, labels and weight tensors, so :mod:`runtime.merging` can take the backbone
and the heads out again (a merge of models made on another machine, or in another release).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol.errors import ModelError

__all__ = ["RECORD_NAME", "Head", "compose"]

RECORD_NAME = "fedge.composition"
RECORD_VERSION = 1
_QUANTISED_TYPES = ("INT8", "UINT8")


@dataclass(frozen=True, slots=True)
class Head:
    """A Dense head: ``[W0, b0, W1, b1, ...]`` with ``W`` (in, out) as Keras keeps it; relu
    between layers, softmax at the end. ``name`` names its output in the composed model."""

    name: str
    weights: tuple[np.ndarray, ...]
    labels: tuple[str, ...] = ()


def flatbuffer_api() -> tuple[Any, Any]:
    """LiteRT's TFLite schema (object API) and its flatbuffer read/write helpers."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    return schema, flatbuffer_utils


def read_flatbuffer(content: bytes) -> Any:
    _, utils = flatbuffer_api()
    try:
        model = utils.read_model_from_bytearray(bytearray(content))
    except Exception as exc:  # the generated reader raises anything on a corrupt buffer
        raise ModelError(f"not a .tflite flatbuffer: {exc}", reason="bad_model") from exc
    if not model.subgraphs:
        raise ModelError("the .tflite model has no subgraph", reason="bad_model")
    return model


def _opcode(model: Any, builtin: int) -> int:
    """The index of ``builtin``'s operator code in the model, added when it is missing."""
    schema, utils = flatbuffer_api()
    for index, code in enumerate(model.operatorCodes or []):
        if utils.get_builtin_code_from_operator_code(code) == builtin and not code.customCode:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    # Codes under 127 also go in the deprecated int8 field, which older runtimes read.
    code.deprecatedBuiltinCode = min(
        builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES
    )
    code.version = 1
    model.operatorCodes = [*(model.operatorCodes or []), code]
    return len(model.operatorCodes) - 1


class _Builder:
    """Appends tensors, constant buffers and operators to a model's first subgraph."""

    def __init__(self, model: Any) -> None:
        self.schema, _ = flatbuffer_api()
        self.model = model
        self.graph = model.subgraphs[0]

    def tensor(self, name: str, shape: Sequence[int], data: np.ndarray | None = None) -> int:
        tensor = self.schema.TensorT()
        tensor.name = name.encode()
        tensor.shape = [int(d) for d in shape]
        if data is not None:
            tensor.type = (
                self.schema.TensorType.INT32
                if data.dtype == np.int32
                else self.schema.TensorType.FLOAT32
            )
            buffer = self.schema.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.model.buffers.append(buffer)
            tensor.buffer = len(self.model.buffers) - 1
        else:
            tensor.type = self.schema.TensorType.FLOAT32
            tensor.buffer = 0  # buffer 0 is the empty one every model starts with
        self.graph.tensors.append(tensor)
        return len(self.graph.tensors) - 1

    def op(
        self,
        builtin: int,
        inputs: Sequence[int],
        output: int,
        options: tuple[int, Any] | None = None,
    ) -> None:
        op = self.schema.OperatorT()
        op.opcodeIndex = _opcode(self.model, builtin)
        op.inputs = list(inputs)
        op.outputs = [output]
        if options is not None:
            op.builtinOptionsType, op.builtinOptions = options
        self.graph.operators.append(op)


def _all_features(b: _Builder, outputs: Sequence[int]) -> int:
    """Every backbone output as float features, concatenated in output order (agents' order)."""
    parts = [_features(b, output, f"fedge/features_{i}") for i, output in enumerate(outputs)]
    if len(parts) == 1:
        return parts[0][0]
    batch = int(b.graph.tensors[parts[0][0]].shape[0])
    joined = b.tensor("fedge/features", [batch, sum(width for _, width in parts)])
    options = b.schema.ConcatenationOptionsT()
    options.axis = 1
    b.op(
        b.schema.BuiltinOperator.CONCATENATION,
        [tensor for tensor, _ in parts],
        joined,
        (b.schema.BuiltinOptions.ConcatenationOptions, options),
    )
    return joined


def _features(b: _Builder, output: int, name: str = "fedge/features") -> tuple[int, int]:
    """One backbone output as float (n, k) features: dequantised and pooled as needed."""
    s = b.schema
    tensor = b.graph.tensors[output]
    shape = [int(d) for d in tensor.shape]
    type_names = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    current = output
    if type_names.get(tensor.type) in _QUANTISED_TYPES:
        current_float = b.tensor(f"{name}_float", shape)
        b.op(s.BuiltinOperator.DEQUANTIZE, [current], current_float)
        current = current_float
    elif tensor.type != s.TensorType.FLOAT32:
        raise ModelError(
            f"the backbone's output is of type {type_names.get(tensor.type)}, not float or int8",
            reason="bad_backbone",
        )
    if len(shape) == 4:
        axes = b.tensor(f"{name}_pool_axes", [2], np.asarray([1, 2], np.int32))
        pooled = b.tensor(name, [shape[0], shape[3]])
        options = s.ReducerOptionsT()
        options.keepDims = False
        b.op(
            s.BuiltinOperator.MEAN,
            [current, axes],
            pooled,
            (s.BuiltinOptions.ReducerOptions, options),
        )
        current = pooled
    elif len(shape) != 2:
        raise ModelError(
            f"the backbone's output {tuple(shape)} is neither features (n, k) nor a feature map",
            reason="bad_backbone",
        )
    return current, shape[-1]


def _check_head(head: Head, features: int) -> list[np.ndarray]:
    weights = [np.asarray(w, np.float32) for w in head.weights]
    if len(weights) < 2 or len(weights) % 2:
        raise ModelError(f"head {head.name}: kernel and bias pairs expected", reason="bad_weights")
    width = features
    for i in range(0, len(weights), 2):
        kernel, bias = weights[i], weights[i + 1]
        if kernel.ndim != 2 or kernel.shape[0] != width or bias.shape != (kernel.shape[1],):
            raise ModelError(
                f"head {head.name}: layer {i // 2} of kernel {kernel.shape} and bias "
                f"{bias.shape} does not take {width} inputs",
                reason="bad_weights",
            )
        width = kernel.shape[1]
    if head.labels and len(head.labels) != width:
        raise ModelError(
            f"head {head.name}: {len(head.labels)} labels for {width} outputs", reason="bad_labels"
        )
    return weights


def _append_head(b: _Builder, head: Head, features: int, batch: int) -> tuple[int, list[int]]:
    """The head's ops after ``features``; its output tensor and weight tensors."""
    s = b.schema
    weights = _check_head(head, b.graph.tensors[features].shape[-1])
    current, layers, kept = features, len(weights) // 2, []
    for i in range(layers):
        kernel, bias = weights[2 * i], weights[2 * i + 1]
        w = b.tensor(
            f"{head.name}/dense_{i}/kernel", kernel.T.shape, np.ascontiguousarray(kernel.T)
        )
        bias_tensor = b.tensor(f"{head.name}/dense_{i}/bias", bias.shape, bias)
        out = b.tensor(f"{head.name}/dense_{i}", [batch, kernel.shape[1]])
        options = s.FullyConnectedOptionsT()
        hidden = i < layers - 1
        options.fusedActivationFunction = (
            s.ActivationFunctionType.RELU if hidden else s.ActivationFunctionType.NONE
        )
        b.op(
            s.BuiltinOperator.FULLY_CONNECTED,
            [current, w, bias_tensor],
            out,
            (s.BuiltinOptions.FullyConnectedOptions, options),
        )
        current = out
        kept += [w, bias_tensor]
    probabilities = b.tensor(head.name, [batch, weights[-1].shape[0]])
    options = s.SoftmaxOptionsT()
    options.beta = 1.0
    b.op(
        s.BuiltinOperator.SOFTMAX,
        [current],
        probabilities,
        (s.BuiltinOptions.SoftmaxOptions, options),
    )
    return probabilities, kept


def compose(backbone: bytes, heads: Sequence[Head], *, backbone_sha256: str | None = None) -> bytes:
    """The backbone with every head after it, as one ``.tflite`` (see the module docstring).

    ``backbone_sha256`` is the sha256 to record for the backbone: by default that of
    ``backbone``; :func:`merge_models` passes on the one its models recorded.
    """
    schema, utils = flatbuffer_api()
    names = [head.name for head in heads]
    if not heads or len(set(names)) != len(names):
        raise ModelError(f"heads need distinct names, got {names}", reason="bad_heads")
    model = read_flatbuffer(backbone)
    graph = model.subgraphs[0]
    output_count = 0 if graph.outputs is None else len(graph.outputs)
    if len(graph.inputs) != 1 or output_count == 0:
        raise ModelError(
            f"a backbone has one input and outputs, this one {len(graph.inputs)} and "
            f"{output_count}",
            reason="bad_backbone",
        )
    model.metadata = [m for m in model.metadata or [] if metadata_name(m) != RECORD_NAME]
    model.buffers = model.buffers or [schema.BufferT()]
    sizes = {
        "operators": len(graph.operators),
        "tensors": len(graph.tensors),
        "buffers": len(model.buffers),
        "operator_codes": len(model.operatorCodes or []),
        "output": int(graph.outputs[0]),
        "outputs": [int(o) for o in graph.outputs],
        "signature_outputs": _signature_outputs(model),
    }
    b = _Builder(model)
    features = _all_features(b, _output_order(model, [int(o) for o in graph.outputs]))
    batch = int(b.graph.tensors[features].shape[0])
    outputs, heads_record = [], []
    for head in heads:
        output, weights = _append_head(b, head, features, batch)
        outputs.append(output)
        heads_record.append({"name": head.name, "labels": list(head.labels), "weights": weights})
    graph.outputs = outputs
    for signature in model.signatureDefs or []:
        if signature.subgraphIndex == 0:
            signature.outputs = [
                tensor_map(name, index) for name, index in zip(names, outputs, strict=True)
            ]
    record = {
        "version": RECORD_VERSION,
        "backbone_sha256": backbone_sha256 or hashlib.sha256(backbone).hexdigest(),
        "backbone": sizes,
        "heads": heads_record,
    }
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(record, sort_keys=True).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = RECORD_NAME.encode()
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*model.metadata, entry]
    content = bytes(utils.convert_object_to_bytearray(model))
    _check_loads(content)
    return content


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _output_order(model: Any, outputs: list[int]) -> list[int]:
    """The backbone's outputs in the order agents read them (``agent.runtime``): by the one
    serving signature's output names in natural order, else the graph's own order."""
    if len(model.signatureDefs or []) != 1:
        return outputs
    named = sorted(_signature_outputs(model), key=lambda pair: _natural_key(pair[0]))
    ordered = [index for _, index in named]
    return ordered if sorted(ordered) == sorted(outputs) else outputs


def metadata_name(metadata: Any) -> str:
    name = metadata.name
    return name.decode() if isinstance(name, bytes) else str(name)


def _signature_outputs(model: Any) -> list[tuple[str, int]]:
    for signature in model.signatureDefs or []:
        if signature.subgraphIndex == 0:
            return [(metadata_name(t), int(t.tensorIndex)) for t in signature.outputs or []]
    return []


def tensor_map(name: str, index: int) -> Any:
    schema, _ = flatbuffer_api()
    mapping = schema.TensorMapT()
    mapping.name = name.encode()
    mapping.tensorIndex = index
    return mapping


def _check_loads(content: bytes) -> None:
    """LiteRT prepares every operator: a composition it cannot run fails here, not on agents."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        Interpreter(model_content=content).allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"the composed model does not load: {exc}", reason="bad_model") from exc
