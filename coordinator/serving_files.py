"""The float serving ``.tflite`` of a release and what its bytes are made of.

The serving model is exported with a fixed batch of one. Keras exports a dynamic batch,
for which the converter keeps ``Flatten`` as a run-time shape computation (SHAPE,
STRIDED_SLICE, PACK, then RESHAPE); static int8 quantisation then adds a DEQUANTIZE in
front of SHAPE, a float op inside the integer model. With the batch fixed, the converter
folds the shape into a constant: on the digits CNN 5 fewer tensors and 4 fewer ops, the
int8 file 1 kB smaller. Agents invoke serving models one frame at a time (and the runtime
slices larger batches), so nothing is lost.

:func:`flatbuffer_breakdown` splits a ``.tflite`` into weights, quantisation parameters,
tensor names and the rest of the flatbuffer, to say where a variant's bytes go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coordinator.tflite_export import export_float_tflite

if TYPE_CHECKING:
    import keras

__all__ = [
    "activation_table",
    "export_serving_tflite",
    "export_sparse_tflite",
    "flatbuffer_breakdown",
]


def _single(model: keras.Model) -> keras.Model:
    import keras

    shape = tuple(model.input_shape[1:])
    single = keras.models.clone_model(model, input_tensors=keras.Input(shape, batch_size=1))
    single.set_weights(model.get_weights())
    return single


def export_serving_tflite(model: keras.Model) -> bytes:
    """``model`` as a float32 ``.tflite`` with its batch dimension fixed to one."""
    return export_float_tflite(_single(model))


def export_sparse_tflite(model: keras.Model) -> bytes:
    """A pruned ``model`` with its sparse kernels in TFLite's sparse tensor format.

    The converter stores a kernel sparse when that is smaller (per block of the format);
    the runtime densifies it once when the model loads (a DENSIFY op per kernel), so the
    file and the download shrink, not the invoke time.
    """
    return export_float_tflite(_single(model), sparse=True)


def _model(tflite: bytes) -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite, 0))


def activation_table(tflite: bytes) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every tensor computed at run time (no constant buffer), in order.

    Only these need calibration ranges; constants (weights, biases, shapes) differ between
    releases (the converter folds zero biases away), activations do not.
    """
    model = _model(tflite)
    (graph,) = model.subgraphs
    out = []
    for tensor in graph.tensors:
        data = model.buffers[tensor.buffer].data
        if data is None or len(data) == 0:
            shape = () if tensor.shape is None else tuple(int(n) for n in tensor.shape)
            out.append((tensor.name.decode(), shape))
    return out


def flatbuffer_breakdown(tflite: bytes) -> dict[str, int]:
    """Bytes of a ``.tflite`` by kind: ``weights`` (constant buffers), ``quantization``
    (scales and int64 zero points, per tensor or per channel), ``names`` (tensor names),
    ``metadata`` (the converter's own records) and ``structure`` (the tensor, operator,
    buffer and signature tables, and alignment)."""
    model = _model(tflite)
    used = {tensor.buffer for graph in model.subgraphs for tensor in graph.tensors}
    meta = {entry.buffer for entry in model.metadata or ()}
    sizes = [0 if b.data is None else len(b.data) for b in model.buffers]
    weights = sum(size for index, size in enumerate(sizes) if index in used)
    metadata = sum(size for index, size in enumerate(sizes) if index in meta)
    quantization = names = 0
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            names += len(tensor.name or b"")
            q = tensor.quantization
            if q is not None:
                quantization += 4 * (0 if q.scale is None else len(q.scale))
                quantization += 8 * (0 if q.zeroPoint is None else len(q.zeroPoint))
    return {
        "total": len(tflite),
        "weights": weights,
        "quantization": quantization,
        "names": names,
        "metadata": metadata,
        "structure": len(tflite) - weights - quantization - names - metadata,
    }
