"""Frame cleaning: blank, saturated and dark frames, perceptual hashes, duplicates."""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np
import pytest
import skimage.data
from sklearn.datasets import load_digits

from agent.cleaning import (
    CleaningPolicy,
    DuplicateFilter,
    FrameCleaner,
    FrameVerdict,
    check_frame,
    hamming,
    perceptual_hash,
)
from protocol.errors import ConfigError, PreprocessError

PHOTOS = ("astronaut", "coffee", "camera", "chelsea", "rocket", "coins", "page")


def _photo(name: str) -> np.ndarray:
    image = np.asarray(getattr(skimage.data, name)())
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image


def _jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    assert decoded is not None
    return np.asarray(decoded)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: _photo(name) for name in PHOTOS}


# -- perceptual hash ----------------------------------------------------------------------


def test_hash_is_a_64_bit_integer(photos: dict[str, np.ndarray]) -> None:
    for image in photos.values():
        phash = perceptual_hash(image)
        assert 0 <= phash < 1 << 64
        assert phash.bit_count() == 32  # median split of 64 distinct coefficients


def test_hamming_counts_differing_bits() -> None:
    assert hamming(0, 0) == 0
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(0, (1 << 64) - 1) == 64


@pytest.mark.parametrize("name", PHOTOS)
def test_jpeg_reencoded_photo_is_a_duplicate(photos: dict[str, np.ndarray], name: str) -> None:
    image = photos[name]
    distance = hamming(perceptual_hash(image), perceptual_hash(_jpeg_round_trip(image, 90)))
    assert distance <= 2
    assert distance <= CleaningPolicy().duplicate_distance


def test_different_photos_are_far_apart(photos: dict[str, np.ndarray]) -> None:
    hashes = [perceptual_hash(image) for image in photos.values()]
    distances = [hamming(a, b) for a, b in itertools.combinations(hashes, 2)]
    assert min(distances) > 3 * CleaningPolicy().duplicate_distance


def test_hash_ignores_colour_layout_and_scale(photos: dict[str, np.ndarray]) -> None:
    camera = photos["camera"]
    as_bgr = cv2.cvtColor(camera, cv2.COLOR_GRAY2BGR)
    assert perceptual_hash(as_bgr) == perceptual_hash(camera)
    assert perceptual_hash(camera[:, :, np.newaxis]) == perceptual_hash(camera)
    half = cv2.resize(camera, (256, 256), interpolation=cv2.INTER_AREA)
    assert hamming(perceptual_hash(half), perceptual_hash(camera)) <= 2


def test_hash_refuses_what_is_not_an_image() -> None:
    with pytest.raises(PreprocessError) as info:
        perceptual_hash(np.zeros((8, 8), dtype=np.float32))
    assert info.value.reason == "bad_image"


# -- single-frame checks ------------------------------------------------------------------


def test_photos_pass(photos: dict[str, np.ndarray]) -> None:
    for image in photos.values():
        assert check_frame(image) is None


@pytest.mark.parametrize("level", [0, 17, 128, 240])
def test_constant_frames_are_blank(level: int) -> None:
    assert check_frame(np.full((48, 64, 3), level, dtype=np.uint8)) is FrameVerdict.BLANK


def test_flat_frame_with_sensor_noise_is_blank() -> None:
    rng = np.random.default_rng(7)
    noisy = np.clip(rng.normal(90.0, 1.0, size=(48, 64, 3)), 0, 255).astype(np.uint8)
    assert check_frame(noisy) is FrameVerdict.BLANK


def test_overexposed_frames_are_saturated(photos: dict[str, np.ndarray]) -> None:
    assert check_frame(np.full((48, 64, 3), 255, dtype=np.uint8)) is FrameVerdict.SATURATED
    washed = cv2.convertScaleAbs(photos["astronaut"], alpha=1.0, beta=240.0)
    assert float(cv2.cvtColor(washed, cv2.COLOR_BGR2GRAY).mean()) > 250.0
    assert check_frame(washed) is FrameVerdict.SATURATED


def test_mostly_clipped_frame_is_saturated_even_with_a_darker_corner() -> None:
    frame = np.full((100, 100), 255, dtype=np.uint8)
    frame[:10, :10] = 0
    fraction_only = CleaningPolicy(saturated_mean=255.0)  # the mean rule can never fire
    assert check_frame(frame, fraction_only) is FrameVerdict.SATURATED
    lenient = CleaningPolicy(saturated_mean=255.0, saturated_fraction=1.0)
    assert check_frame(frame, lenient) is None


def test_dark_ink_on_white_paper_is_not_saturated() -> None:
    page = cv2.resize(_photo("page"), (128, 64), interpolation=cv2.INTER_AREA)
    assert check_frame(page) is None
    assert check_frame(255 - page) is None


def test_too_dark_is_off_by_default_and_on_when_asked(photos: dict[str, np.ndarray]) -> None:
    dim = cv2.convertScaleAbs(photos["coffee"], alpha=0.05)
    assert check_frame(dim) is None
    assert check_frame(dim, CleaningPolicy(too_dark_mean=10.0)) is FrameVerdict.TOO_DARK


def test_verdicts_are_machine_readable_strings() -> None:
    assert [verdict.value for verdict in FrameVerdict] == [
        "blank",
        "saturated",
        "too_dark",
        "duplicate",
    ]
    assert isinstance(FrameVerdict.BLANK, str)


@pytest.mark.parametrize(
    "overrides",
    [{"saturated_fraction": 0.0}, {"duplicate_distance": 65}, {"duplicate_window_s": 0.0}],
)
def test_impossible_policies_are_refused(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CleaningPolicy(**overrides)  # type: ignore[arg-type]


# -- duplicate filter ---------------------------------------------------------------------


def test_duplicate_within_window_and_fresh_after_it() -> None:
    dupes = DuplicateFilter(window_s=10.0, max_distance=4)
    phash = 0x0123_4567_89AB_CDEF
    near = phash ^ 0b101  # two bits away
    assert dupes.check("cam", phash, now_s=100.0) is False
    assert dupes.check("cam", near, now_s=105.0) is True
    assert dupes.check("cam", phash, now_s=110.0) is True  # the window includes its edge
    assert dupes.check("cam", near, now_s=110.5) is False  # first sighting expired


def test_a_duplicate_does_not_renew_the_window() -> None:
    dupes = DuplicateFilter(window_s=10.0)
    for now_s in (0.0, 4.0, 8.0):
        assert dupes.check("cam", 42, now_s) is (now_s > 0.0)
    assert dupes.check("cam", 42, 10.5) is False


def test_far_hashes_are_not_duplicates() -> None:
    dupes = DuplicateFilter(max_distance=4)
    assert dupes.check("cam", 0, 0.0) is False
    assert dupes.check("cam", 0b11111, 1.0) is False  # five bits away
    assert dupes.check("cam", 0b11110, 2.0) is True  # one bit from the second


def test_sources_are_independent() -> None:
    dupes = DuplicateFilter()
    assert dupes.check("cam-1", 7, 0.0) is False
    assert dupes.check("cam-2", 7, 0.0) is False
    assert dupes.check("cam-1", 7, 1.0) is True


def test_infinite_window_remembers_forever() -> None:
    dupes = DuplicateFilter(window_s=math.inf)
    assert dupes.check("store", 99, 0.0) is False
    assert dupes.check("store", 99, 1e12) is True


def test_memory_per_source_is_bounded() -> None:
    dupes = DuplicateFilter(window_s=math.inf, max_distance=0, max_per_source=3)
    for i, phash in enumerate((1, 2, 4, 8)):
        assert dupes.check("cam", phash, float(i)) is False
    assert dupes.check("cam", 8, 5.0) is True
    assert dupes.check("cam", 1, 6.0) is False  # the oldest hash was forgotten


def test_number_of_sources_is_bounded_least_recent_first() -> None:
    dupes = DuplicateFilter(window_s=math.inf, max_sources=2)
    assert dupes.check("a", 1, 0.0) is False
    assert dupes.check("b", 1, 1.0) is False
    assert dupes.check("a", 1, 2.0) is True  # "a" is now the most recent
    assert dupes.check("c", 1, 3.0) is False  # evicts "b"
    assert dupes.check("a", 1, 4.0) is True
    assert dupes.check("b", 1, 5.0) is False


@pytest.mark.parametrize(
    "kwargs",
    [{"window_s": 0.0}, {"max_distance": -1}, {"max_per_source": 0}, {"max_sources": 0}],
)
def test_impossible_filters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        DuplicateFilter(**kwargs)  # type: ignore[arg-type]


# -- the full cleaner ---------------------------------------------------------------------


def test_cleaner_rejects_blank_and_repeated_frames(photos: dict[str, np.ndarray]) -> None:
    cleaner = FrameCleaner(CleaningPolicy(duplicate_window_s=5.0))
    astronaut, coffee = photos["astronaut"], photos["coffee"]
    assert cleaner.check(astronaut, "cam", 0.0) is None
    assert cleaner.check(_jpeg_round_trip(astronaut, 90), "cam", 1.0) is FrameVerdict.DUPLICATE
    assert cleaner.check(coffee, "cam", 2.0) is None
    assert cleaner.check(astronaut, "other-cam", 2.0) is None
    assert cleaner.check(np.zeros_like(astronaut), "cam", 3.0) is FrameVerdict.BLANK
    assert cleaner.check(astronaut, "cam", 6.0) is None  # the window has passed


def test_cleaner_keeps_distinct_digits_in_a_store() -> None:
    digits = load_digits()
    cleaner = FrameCleaner(CleaningPolicy(duplicate_distance=2, duplicate_window_s=math.inf))
    verdicts = []
    for i, image in enumerate(digits.images[:200]):
        gray = np.rint(image * (255.0 / 16.0)).astype(np.uint8)
        big = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_NEAREST)
        verdicts.append(cleaner.check(big, "store", float(i)))
    assert verdicts.count(FrameVerdict.DUPLICATE) <= 2
    assert all(verdict in (None, FrameVerdict.DUPLICATE) for verdict in verdicts)
    again = np.rint(digits.images[0] * (255.0 / 16.0)).astype(np.uint8)
    big = cv2.resize(again, (64, 64), interpolation=cv2.INTER_NEAREST)
    assert cleaner.check(big, "store", 1e9) is FrameVerdict.DUPLICATE
