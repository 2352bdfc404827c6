"""Train the reference CNN on the digits and write its TFLite models.

    python bench/make_models.py --out DIR [--epochs N]

Writes the float32, int8 and uint8 digits models, the Keras model, labels.txt,
preprocess.json and a two-output test model, then prints each file and the test-split
accuracy of each digits ``.tflite`` as the agent's runtime sees it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from agent.runtime import TfliteModel
from coordinator.reference import load_digits_split
from coordinator.tflite_export import write_reference_models


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    model = TfliteModel.from_path(path)
    (probs,) = model.predict(x)
    return float(np.mean(np.argmax(probs, axis=1) == y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--epochs", type=int, default=30, help="centralised training epochs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    models = write_reference_models(args.out, epochs=args.epochs)
    split = load_digits_split()
    print(f"{'file':<32} {'bytes':>8}  test accuracy")
    for path in models.all_paths():
        accuracy = ""
        if path.suffix == ".tflite" and path.name.startswith("digits_"):
            accuracy = f"{_accuracy(path, split.x_test, split.y_test):.4f}"
        print(f"{path.name:<32} {path.stat().st_size:>8}  {accuracy}")
    print(f"written to {models.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
