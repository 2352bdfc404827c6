"""protocol/ stays pure: importing it must not pull in MQTT, OpenCV, LiteRT or TensorFlow."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "protocol"
HEAVY = (
    "paho",
    "cv2",
    "ai_edge_litert",
    "tflite_runtime",
    "tensorflow",
    "keras",
    "agent",
    "coordinator",
    "runtime",
    "fedge",
)


def test_importing_every_protocol_module_loads_nothing_heavy() -> None:
    modules = sorted(
        ".".join(path.relative_to(PROTOCOL_DIR.parent).with_suffix("").parts)
        for path in PROTOCOL_DIR.rglob("*.py")
    )
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROTOCOL_DIR.parent,
    )
    loaded = json.loads(result.stdout)
    heavy = [name for name in loaded if name.split(".")[0] in HEAVY]
    assert heavy == []
    assert "protocol.topics" in loaded


def test_numpy_is_imported_only_by_the_tensor_codec() -> None:
    importers = []
    for path in PROTOCOL_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name.split(".")[0] == "numpy" for name in names):
                importers.append(path.name)
    # The tensor codec: named arrays (tensors.py) and weights/updates built on it (updates.py,
    # and masks.py: pruning masks and updates cut to the kept weights); secure aggregation's
    # wire arithmetic (secagg.py: quantisation and masks mod 2^32).
    assert set(importers) <= {"tensors.py", "updates.py", "masks.py", "secagg.py"}
