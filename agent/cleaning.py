"""Which frames are worth keeping: blank, saturated, dark and duplicate frames are not.

Pure: images and times come in, verdicts go out; nothing here reads a clock, so the
same inputs always give the same verdicts.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

import cv2
import numpy as np

from protocol.errors import ConfigError, PreprocessError

__all__ = [
    "CleaningPolicy",
    "DuplicateFilter",
    "FrameCleaner",
    "FrameVerdict",
    "check_frame",
    "hamming",
    "perceptual_hash",
]

_HASH_SIDE_PX = 32  # the DCT input; its 8x8 lowest frequencies make the 64 bits
_HASH_BAND = 8


class FrameVerdict(StrEnum):
    """Why a frame was rejected; the value is the machine-readable reason."""

    BLANK = "blank"
    SATURATED = "saturated"
    TOO_DARK = "too_dark"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class CleaningPolicy:
    """Thresholds for rejecting frames; all levels are 8-bit grey levels (0..255).

    - ``blank_std``: a frame whose grey standard deviation is below this is near-constant
      (lens cap, black or grey screen, a blank sheet). 2.0 is above sensor noise on a flat
      surface yet far below any scene with content.
    - ``saturated_mean`` / ``saturated_fraction``: a frame whose mean grey is above
      ``saturated_mean`` (250) or with at least ``saturated_fraction`` (98%) of its
      pixels at 255 is overexposed. Dark ink on white paper stays well below both.
    - ``too_dark_mean``: frames with a mean grey below this are rejected; None (the
      default) keeps dark frames, since a dim scene can still be a valid input.
    - ``duplicate_distance``: two frames whose 64-bit perceptual hashes differ in at most
      this many bits show the same thing. Re-encoding a photo as JPEG moves the hash by
      0-2 bits; distinct photos are ~32 apart; 4 leaves room for sensor noise. For a
      sample store of tiny images use less: among the 1797 scikit-learn digits, 4 calls
      89 distinct samples duplicates and 2 calls 7.
    - ``duplicate_window_s``: how long a frame counts as seen; ``math.inf`` for a sample
      store, where a duplicate is a duplicate forever.
    """

    blank_std: float = 2.0
    saturated_mean: float = 250.0
    saturated_fraction: float = 0.98
    too_dark_mean: float | None = None
    duplicate_distance: int = 4
    duplicate_window_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 < self.saturated_fraction <= 1.0:
            raise ConfigError(
                f"saturated_fraction must be in (0, 1], got {self.saturated_fraction}"
            )
        if not 0 <= self.duplicate_distance <= 64:
            raise ConfigError(f"duplicate_distance must be in 0..64, got {self.duplicate_distance}")
        if not self.duplicate_window_s > 0.0:
            raise ConfigError(f"duplicate_window_s must be > 0, got {self.duplicate_window_s}")


def check_frame(image_bgr: np.ndarray, policy: CleaningPolicy | None = None) -> FrameVerdict | None:
    """Why a single frame is unusable (saturated, too dark, blank), or None if it is fine.

    Duplicates need memory of earlier frames: see :class:`DuplicateFilter` and
    :class:`FrameCleaner`.
    """
    return _check_gray(_gray(image_bgr), policy or CleaningPolicy())


def perceptual_hash(image_bgr: np.ndarray) -> int:
    """64-bit DCT perceptual hash (pHash) of a uint8 BGR or grey image.

    Grey, shrink to 32x32, DCT, then one bit per coefficient of the 8x8 lowest
    frequencies after the DC row and column (which carry overall brightness, not
    structure): set when the coefficient is above their median.

    Written here on OpenCV's DCT: ``cv2.img_hash`` exists only in opencv-contrib, and
    the imagehash package pulls Pillow, SciPy and PyWavelets onto every agent.
    """
    return _hash_gray(_gray(image_bgr))


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


class DuplicateFilter:
    """Remembers recent hashes per source and says whether a new one was seen already.

    Memory is bounded: at most ``max_per_source`` hashes per source (oldest forgotten
    first) and ``max_sources`` sources (least recently checked forgotten first).
    A duplicate does not renew the time of the frame it matched, so a scene that stays
    still passes once per window rather than never again.
    """

    def __init__(
        self,
        *,
        window_s: float = 10.0,
        max_distance: int = 4,
        max_per_source: int = 256,
        max_sources: int = 64,
    ) -> None:
        if not window_s > 0.0:
            raise ConfigError(f"window_s must be > 0, got {window_s}")
        if not 0 <= max_distance <= 64:
            raise ConfigError(f"max_distance must be in 0..64, got {max_distance}")
        if max_per_source < 1 or max_sources < 1:
            raise ConfigError("max_per_source and max_sources must be at least 1")
        self._window_s = window_s
        self._max_distance = max_distance
        self._max_per_source = max_per_source
        self._max_sources = max_sources
        self._seen: OrderedDict[str, deque[tuple[float, int]]] = OrderedDict()

    def check(self, source: str, phash: int, now_s: float) -> bool:
        """True if ``phash`` matches a hash seen from ``source`` within the window.

        A hash that is not a duplicate is remembered at ``now_s``.
        """
        seen = self._seen.get(source)
        if seen is None:
            seen = deque(maxlen=self._max_per_source)
            self._seen[source] = seen
            if len(self._seen) > self._max_sources:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(source)
        if not math.isinf(self._window_s):
            oldest_s = now_s - self._window_s
            # Times arrive mostly in order, so expired entries sit at the left.
            while seen and seen[0][0] < oldest_s:
                seen.popleft()
        if any(hamming(phash, known) <= self._max_distance for _, known in seen):
            return True
        seen.append((now_s, phash))
        return False


@dataclass(slots=True)
class FrameCleaner:
    """A policy and a duplicate filter together: the full verdict for a frame."""

    policy: CleaningPolicy = field(default_factory=CleaningPolicy)
    duplicates: DuplicateFilter = field(init=False)

    def __post_init__(self) -> None:
        self.duplicates = DuplicateFilter(
            window_s=self.policy.duplicate_window_s, max_distance=self.policy.duplicate_distance
        )

    def check(self, image_bgr: np.ndarray, source: str, now_s: float) -> FrameVerdict | None:
        """The rejection reason for a frame from ``source`` at ``now_s``, or None to keep it."""
        gray = _gray(image_bgr)
        verdict = _check_gray(gray, self.policy)
        if verdict is not None:
            return verdict
        if self.duplicates.check(source, _hash_gray(gray), now_s):
            return FrameVerdict.DUPLICATE
        return None


def _gray(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.size == 0:
        raise PreprocessError("expected a non-empty uint8 image", reason="bad_image")
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 2:
        return image
    raise PreprocessError(f"expected HxW, HxWx1 or HxWx3, got {image.shape}", reason="bad_image")


def _check_gray(gray: np.ndarray, policy: CleaningPolicy) -> FrameVerdict | None:
    mean_px, std_px = cv2.meanStdDev(gray)
    mean, std = float(mean_px[0, 0]), float(std_px[0, 0])
    if mean > policy.saturated_mean:
        return FrameVerdict.SATURATED
    if np.count_nonzero(gray == 255) >= policy.saturated_fraction * gray.size:
        return FrameVerdict.SATURATED
    if policy.too_dark_mean is not None and mean < policy.too_dark_mean:
        return FrameVerdict.TOO_DARK
    if std < policy.blank_std:
        return FrameVerdict.BLANK
    return None


def _hash_gray(gray: np.ndarray) -> int:
    small = cv2.resize(gray, (_HASH_SIDE_PX, _HASH_SIDE_PX), interpolation=cv2.INTER_AREA)
    coefficients = cv2.dct(small.astype(np.float32))
    band = coefficients[1 : _HASH_BAND + 1, 1 : _HASH_BAND + 1].ravel()
    bits = band > np.median(band)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")
