"""Activation ranges of the release's float serving model over this agent's own samples.

The coordinator quantises the fleet model to full-integer int8 without seeing any image:
each agent runs the float model on its samples with every intermediate tensor kept, takes
each tensor's min and max (the statistics a static int8 quantiser needs) and sends them
with its update: a few hundred bytes instead of the images. The coordinator takes the
minimum of the minima and the maximum of the maxima, which is what calibrating on all the
agents' images at once would have given.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from protocol.errors import ModelError
from protocol.messages.variants import MAX_RANGED_TENSORS, ActivationRanges, TensorRange

__all__ = ["MAX_CALIBRATION_SAMPLES", "measure_activation_ranges", "preserving_all_tensors"]

logger = logging.getLogger(__name__)

# Ranges settle after a few hundred images; more only costs the agent time.
MAX_CALIBRATION_SAMPLES: Final = 256
_PRESERVE_ALL_WARNING: Final = r"(?s).*experimental_preserve_all_tensors"


def measure_activation_ranges(
    float_tflite: bytes, samples: npt.ArrayLike, *, seed: int = 0
) -> ActivationRanges:
    """Min/max per tensor of ``float_tflite`` (one signature, one input) over ``samples``."""
    from litert_quantizer import calibrator, recipe, recipe_manager
    from litert_quantizer.utils import qsv_utils

    x = np.asarray(samples, np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ModelError(f"calibration needs a batch of samples, got shape {x.shape}")
    if len(x) > MAX_CALIBRATION_SAMPLES:
        pick = np.random.default_rng(seed).choice(len(x), MAX_CALIBRATION_SAMPLES, replace=False)
        x = x[np.sort(pick)]
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe.static_wi8_ai8())
    try:
        # min_max_update (not the default moving average) makes the result independent of
        # sample order, so merging agents' ranges equals calibrating on their union.
        with preserving_all_tensors():
            calib = calibrator.Calibrator(
                float_tflite, num_threads=1, qsv_update_func=qsv_utils.min_max_update
            )
            signature, input_name = _single_input(float_tflite)
            calib.calibrate({signature: [{input_name: sample[None]} for sample in x]}, manager)
            qsvs: dict[str, dict[str, Any]] = calib.get_model_qsvs()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"calibration failed: {exc}", reason="calibration") from exc
    tensors = {
        name: TensorRange(min=float(np.min(qsv["min"])), max=float(np.max(qsv["max"])))
        for name, qsv in qsvs.items()
        if "min" in qsv and "max" in qsv
    }
    if len(tensors) > MAX_RANGED_TENSORS:
        raise ModelError(f"model has {len(tensors)} tensors to range, over {MAX_RANGED_TENSORS}")
    return ActivationRanges(
        model_sha256=hashlib.sha256(float_tflite).hexdigest(), samples=len(x), tensors=tensors
    )


@contextlib.contextmanager
def preserving_all_tensors() -> Iterator[None]:
    """Silence LiteRT's warning that keeping every tensor is for debugging: calibration and
    the quantiser's own checks need exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PRESERVE_ALL_WARNING)
        yield


def _single_input(float_tflite: bytes) -> tuple[str, str]:
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=float_tflite).get_signature_list()
    if len(signatures) != 1:
        raise ModelError(f"serving model has {len(signatures)} signatures, expected one")
    ((key, io),) = signatures.items()
    if len(io["inputs"]) != 1:
        raise ModelError(f"serving model has {len(io['inputs'])} inputs, expected one")
    return str(key), str(io["inputs"][0])
