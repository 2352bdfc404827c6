"""Detectors through the agent's pipeline (no broker): objects against independent decoding."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from agent.detection import POSTPROCESS_OP, resolve_detector
from agent.intake import PendingFrame
from agent.model import ServingModel, load_serving_model
from agent.pipeline import FrameProcessor, InferenceOptions
from agent.preprocess import decode_image, input_geometry
from protocol.errors import ModelError
from protocol.messages.agent import InferenceResult
from protocol.messages.codec import decode_message, encode_message
from protocol.preprocess import DetectionFormat, DetectionSpec, OutputRole, PreprocessSpec
from tests.agent.detection_checks import assert_objects_match, expected_objects, raw_ssd_objects
from tests.agent.detectors import SSD_LABELS, YOLO_LABELS, DetectorFiles


def jpeg(photo: np.ndarray) -> bytes:
    rgb = photo[..., :3] if photo.ndim == 3 else np.repeat(photo[..., None], 3, axis=-1)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return encoded.tobytes()


COFFEE = jpeg(skimage_data.coffee())  # type: ignore[no-untyped-call]
ROCKET = jpeg(skimage_data.rocket())  # type: ignore[no-untyped-call]
CHELSEA = jpeg(skimage_data.chelsea())  # type: ignore[no-untyped-call]


def serve(files: DetectorFiles) -> ServingModel:
    return load_serving_model(
        files.model, version="det-1", labels_path=files.labels, preprocess_path=files.preprocess
    )


def run(
    serving: ServingModel, photo: bytes, options: InferenceOptions | None = None
) -> InferenceResult:
    frame = PendingFrame(source="door", topic="t", payload=photo, received_at=time.time())
    outcome = FrameProcessor(agent_id="pi-1").process(frame, serving, options or InferenceOptions())
    # What goes on the wire, read back: the message itself must accept the objects.
    decoded = decode_message(encode_message(outcome.result), InferenceResult)
    assert decoded == outcome.result
    return decoded


def test_the_ssd_model_carries_the_postprocess_op_and_is_recognised(
    ssd_detector: DetectorFiles,
) -> None:
    serving = serve(ssd_detector)
    assert serving.model.op_output_positions(POSTPROCESS_OP) is not None
    assert serving.detector is not None
    assert serving.detector.format is DetectionFormat.TFLITE_POSTPROCESS
    assert not serving.classifier


@pytest.mark.parametrize("photo", [COFFEE, CHELSEA], ids=["coffee", "chelsea"])
def test_ssd_objects_match_numpy_and_the_raw_outputs(
    ssd_detector: DetectorFiles, photo: bytes
) -> None:
    result = run(serve(ssd_detector), photo)
    assert result.objects is not None
    assert result.predictions == ()
    assert result.outputs == ()
    assert_objects_match(result.objects, raw_ssd_objects(ssd_detector, photo, SSD_LABELS))
    assert_objects_match(result.objects, expected_objects(ssd_detector, photo, SSD_LABELS))
    assert {o.label for o in result.objects} == set(SSD_LABELS)  # both classes turn up


def test_yolo_objects_match_numpy_decoding_with_nms_and_letterbox(
    yolo_detector: DetectorFiles,
) -> None:
    serving = serve(yolo_detector)
    assert serving.detector is not None
    assert serving.detector.format is DetectionFormat.YOLO
    result = run(serving, ROCKET)
    assert result.objects is not None
    assert_objects_match(result.objects, expected_objects(yolo_detector, ROCKET, YOLO_LABELS))
    assert len({o.label for o in result.objects}) >= 2  # NMS ran per class
    height, width = decode_image(ROCKET).shape[:2]
    for obj in result.objects:
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= width
        assert 0 <= y0 < y1 <= height


def test_yolov8_layout_without_objectness(yolo8_detector: DetectorFiles) -> None:
    serving = serve(yolo8_detector)
    assert serving.detector is not None
    assert serving.detector.transposed
    assert not serving.detector.objectness
    result = run(serving, CHELSEA)
    assert result.objects is not None
    assert_objects_match(result.objects, expected_objects(yolo8_detector, CHELSEA, YOLO_LABELS))


def test_live_limits_override_the_spec(yolo_detector: DetectorFiles) -> None:
    serving = serve(yolo_detector)
    everything = run(serving, ROCKET).objects
    assert everything is not None
    assert len(everything) > 3
    cut = everything[2].score
    fewer = run(serving, ROCKET, InferenceOptions(detection_threshold=cut)).objects
    assert fewer == everything[:3]  # greedy NMS keeps the same best boxes
    two = run(serving, ROCKET, InferenceOptions(max_objects=2)).objects
    assert two == everything[:2]


@pytest.mark.parametrize("fault", ["nan", "count"])
def test_broken_detector_outputs_raise_bad_output(
    broken_detectors: dict[str, DetectorFiles], fault: str
) -> None:
    serving = serve(broken_detectors[fault])
    assert serving.detector is not None  # recognised by shape alone, without the op
    with pytest.raises(ModelError) as caught:
        run(serving, COFFEE)
    assert caught.value.reason == "bad_output"


# -- recognising layouts from shapes (pure) ----------------------------------------------

SIZE = (96, 96)
POSTPROCESS_SHAPES = [(1, 10, 4), (1, 10), (1, 10), (1,)]
STRETCH = PreprocessSpec(height=SIZE[1], width=SIZE[0])


@pytest.mark.parametrize(
    "shapes",
    [
        [(1, 10)],  # a classifier
        [(1, 1, 128)],  # an embedding
        [(1, 896, 16), (1, 896, 1)],  # a face detector's raw regressors: stays raw
        [(1, 10, 4), (1, 10), (1, 11), (1,)],  # rows disagree
        [(1, 8, 64, 64)],  # a feature map
    ],
)
def test_other_outputs_are_not_detectors(shapes: list[tuple[int, ...]]) -> None:
    assert resolve_detector(shapes, None, input_size=SIZE) is None


def test_format_none_turns_recognition_off() -> None:
    spec = DetectionSpec(format=DetectionFormat.NONE)
    assert resolve_detector(POSTPROCESS_SHAPES, spec, input_size=SIZE) is None


def test_yolo_objectness_follows_the_labels_when_they_are_given() -> None:
    with_objectness = resolve_detector([(1, 100, 8)], None, input_size=SIZE, labels=("a", "b", "c"))
    without = resolve_detector([(1, 100, 8)], None, input_size=SIZE, labels=("a", "b", "c", "d"))
    assert with_objectness is not None
    assert with_objectness.objectness
    assert without is not None
    assert not without.objectness
    assert resolve_detector([(1, 100, 8)], None, input_size=SIZE, labels=("a",)) is None


@pytest.mark.parametrize(
    ("shapes", "spec"),
    [
        ([(1, 10)], DetectionSpec(format=DetectionFormat.YOLO)),
        ([(1, 10)], DetectionSpec(format=DetectionFormat.TFLITE_POSTPROCESS)),
        (
            [(1, 100, 8)],
            DetectionSpec(format=DetectionFormat.YOLO, yolo_objectness=True, label_offset=5),
        ),
    ],
)
def test_an_explicit_format_that_does_not_fit_is_refused(
    shapes: list[tuple[int, ...]], spec: DetectionSpec
) -> None:
    with pytest.raises(ModelError) as caught:
        resolve_detector(shapes, spec, input_size=SIZE, labels=("a", "b", "c"))
    assert caught.value.reason == "spec_mismatch"


def test_output_roles_from_the_spec() -> None:
    roles = (OutputRole.SCORES, OutputRole.BOXES, OutputRole.COUNT, OutputRole.CLASSES)
    shapes = [(1, 10), (1, 10, 4), (1,), (1, 10)]
    detector = resolve_detector(shapes, DetectionSpec(outputs=roles), input_size=SIZE)
    assert detector is not None
    assert detector.roles == (1, 3, 0, 2)  # boxes, classes, scores, count


def _postprocess_outputs(count: float = 2.0) -> list[np.ndarray]:
    boxes = np.array([[[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]] + [[0, 0, 0, 0]] * 8])
    classes = np.zeros((1, 10))
    scores = np.array([[0.9, 0.8] + [0.0] * 8])
    return [boxes.astype(np.float32), classes, scores, np.array([count])]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda o: o.__setitem__(0, o[0][:, :5]),  # fewer rows than loaded
        lambda o: o.__setitem__(3, np.array([11.0])),  # count beyond the rows
        lambda o: o.__setitem__(3, np.array([1.5])),  # not a whole count
        lambda o: o.__setitem__(3, np.array([np.nan])),
        lambda o: o[2].__setitem__((0, 0), np.nan),
        lambda o: o[2].__setitem__((0, 0), 7.0),  # a logit, not a probability
        lambda o: o[1].__setitem__((0, 1), -1.0),  # a negative class
        lambda o: o[0].__setitem__((0, 1, 2), np.inf),
    ],
)
def test_bad_output_values_raise_bad_output(corrupt: object) -> None:
    detector = resolve_detector(POSTPROCESS_SHAPES, None, input_size=SIZE)
    assert detector is not None
    outputs = _postprocess_outputs()
    corrupt(outputs)  # type: ignore[operator]
    geometry = input_geometry(192, 96, STRETCH)
    with pytest.raises(ModelError) as caught:
        detector.decode(outputs, geometry, None, detector.limits())
    assert caught.value.reason == "bad_output"


def test_boxes_map_back_to_the_frame_through_a_stretch() -> None:
    detector = resolve_detector(POSTPROCESS_SHAPES, None, input_size=SIZE)
    assert detector is not None
    geometry = input_geometry(192, 96, STRETCH)
    found = detector.decode(_postprocess_outputs(), geometry, ("cat",), detector.limits())
    assert [(d.label, d.score) for d in found] == [("cat", 0.9), ("cat", pytest.approx(0.8))]
    # ymin, xmin, ymax, xmax = 0.1, 0.2, 0.5, 0.6 of a 192 x 96 frame
    assert found[0].box == pytest.approx((0.2 * 192, 0.1 * 96, 0.6 * 192, 0.5 * 96))
    assert found[1].box == pytest.approx((0.0, 0.0, 192.0, 96.0))
