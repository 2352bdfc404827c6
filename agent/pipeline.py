"""One frame through the stages: unwrap, decode, clean, prepare, invoke, post-process.

Each stage is a function of its own module; this one only chains them and times them.
It raises only fedge errors, each with the reason an error event will carry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from agent.cleaning import FrameCleaner
from agent.detection import Detector
from agent.intake import PendingFrame
from agent.model import ServingModel
from agent.postprocess import classify, summarize_output
from agent.preprocess import decode_image, input_geometry, prepare_input
from protocol.errors import PreprocessError
from protocol.frames import DEFAULT_MAX_FRAME_BYTES, FrameMeta, decode_frame
from protocol.messages.agent import (
    DetectedObject,
    InferenceResult,
    OutputTensor,
    Prediction,
    Timings,
)

__all__ = ["FrameOutcome", "FrameProcessor", "InferenceOptions"]

_MS_PER_S = 1000.0


@dataclass(frozen=True, slots=True)
class InferenceOptions:
    top_k: int = 3
    threshold: float = 0.0
    # Detectors: None leaves the model's detection spec in charge.
    detection_threshold: float | None = None
    max_objects: int | None = None
    iou_threshold: float | None = None


@dataclass(frozen=True, slots=True)
class FrameOutcome:
    result: InferenceResult
    meta: FrameMeta
    image: bytes  # the encoded image, kept for `label` commands and the sample store
    pixels: np.ndarray  # decoded BGR


class FrameProcessor:
    """Turns pending frames into results; holds the little state cleaning needs."""

    def __init__(
        self,
        *,
        agent_id: str,
        cleaner: FrameCleaner | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self._agent_id = agent_id
        self._cleaner = cleaner
        self._max_frame_bytes = max_frame_bytes
        self._sequence = 0

    def process(
        self, frame: PendingFrame, serving: ServingModel, options: InferenceOptions
    ) -> FrameOutcome:
        started = time.perf_counter()
        unwrapped = decode_frame(frame.payload, max_bytes=self._max_frame_bytes)
        self._sequence += 1
        frame_id = unwrapped.meta.frame_id or f"{frame.source}-{self._sequence}"
        pixels = decode_image(unwrapped.image)
        decoded = time.perf_counter()
        if self._cleaner is not None:
            verdict = self._cleaner.check(pixels, frame.source, frame.received_at)
            if verdict is not None:
                raise PreprocessError(
                    f"frame {frame_id} rejected: {verdict.value}", reason=verdict.value
                )
        tensor = prepare_input(pixels, serving.spec)
        prepared = time.perf_counter()
        outputs = serving.model.predict(tensor)
        invoked = time.perf_counter()
        detector = serving.detector
        if detector is not None:
            objects: tuple[DetectedObject, ...] | None = self._detect(
                detector, outputs, pixels, serving, options
            )
            predictions: tuple[Prediction, ...] = ()
            raw: tuple[OutputTensor, ...] = ()
        else:
            objects = None
            predictions, raw = self._postprocess(outputs, serving, options)
        finished = time.perf_counter()
        since_capture_ms = None
        if unwrapped.meta.timestamp is not None:
            since_capture_ms = (time.time() - unwrapped.meta.timestamp) * _MS_PER_S
        result = InferenceResult(
            agent=self._agent_id,
            source=frame.source,
            frame_id=frame_id,
            model_version=serving.version,
            timestamp=time.time(),
            timings=Timings(
                decode_ms=(decoded - started) * _MS_PER_S,
                preprocess_ms=(prepared - decoded) * _MS_PER_S,
                invoke_ms=(invoked - prepared) * _MS_PER_S,
                total_ms=(finished - started) * _MS_PER_S,
                since_capture_ms=since_capture_ms,
            ),
            predictions=predictions,
            outputs=raw,
            objects=objects,
        )
        meta = unwrapped.meta.model_copy(update={"frame_id": frame_id})
        return FrameOutcome(result=result, meta=meta, image=unwrapped.image, pixels=pixels)

    @staticmethod
    def _detect(
        detector: Detector,
        outputs: list[np.ndarray],
        pixels: np.ndarray,
        serving: ServingModel,
        options: InferenceOptions,
    ) -> tuple[DetectedObject, ...]:
        height, width = pixels.shape[:2]
        limits = detector.limits(
            options.detection_threshold, options.max_objects, options.iou_threshold
        )
        found = detector.decode(
            outputs, input_geometry(width, height, serving.spec), serving.labels, limits
        )
        return tuple(
            DetectedObject(index=d.index, label=d.label[:1024], score=d.score, box=d.box)
            for d in found
        )

    @staticmethod
    def _postprocess(
        outputs: list[np.ndarray], serving: ServingModel, options: InferenceOptions
    ) -> tuple[tuple[Prediction, ...], tuple[OutputTensor, ...]]:
        if serving.classifier:
            ranked = classify(
                outputs[0][0], serving.labels, top_k=options.top_k, threshold=options.threshold
            )
            return tuple(
                Prediction(index=p.index, label=p.label, score=float(p.score)) for p in ranked
            ), ()
        raw = []
        for position, (output, info) in enumerate(
            zip(outputs, serving.model.output_details, strict=True)
        ):
            summary = summarize_output(output[0], name=info.name or f"output_{position}")
            raw.append(
                OutputTensor(
                    name=summary.name,
                    shape=summary.shape,
                    dtype=summary.dtype,
                    values=summary.values,
                    truncated=summary.truncated,
                    minimum=summary.min,
                    maximum=summary.max,
                    mean=summary.mean,
                    std=summary.std,
                )
            )
        return (), tuple(raw)
