"""Random changes to training samples, so a small local store teaches more.

For training only: inference sees frames as they are. Every random draw comes from one
seeded generator, so a seed and the sequence of inputs fix every output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from protocol.errors import ConfigError, PreprocessError

__all__ = ["AugmentConfig", "Augmenter"]

# Aspect ratios of an erased rectangle, as in random erasing (Zhong et al., 2017).
_ERASE_ASPECT_RANGE = (0.3, 1.0 / 0.3)

FloatRange = tuple[float, float]


@dataclass(frozen=True, slots=True)
class AugmentConfig:
    """Probabilities (``*_p``, 0..1) and ranges of each augmentation.

    The defaults suit handwritten digits and other images whose meaning changes when
    mirrored: no flips, rotation within +-10 degrees, scale 0.9-1.1, brightness and
    saturation +-20%, no crop, no erasing; borders filled with ``fill_value`` (0: the
    dark background of bright-ink digits). :meth:`for_photos` turns more on.

    - ``rotation_deg``: angles are uniform in [-rotation_deg, rotation_deg].
    - ``scale_range``: zoom factor about the centre (>1 enlarges).
    - ``crop_side_range``: side of the random crop as a fraction of the image side; the
      crop is resized back to the full size.
    - ``erase_area_range``: area of the erased rectangle (filled with noise) as a
      fraction of the image.
    - ``brightness_range`` / ``saturation_range``: multiplicative factors.
    - ``reflect_border``: fill what rotation and scaling uncover by mirroring the image
      rather than with ``fill_value``.
    """

    hflip_p: float = 0.0
    vflip_p: float = 0.0
    rotate_p: float = 0.5
    rotation_deg: float = 10.0
    scale_p: float = 0.5
    scale_range: FloatRange = (0.9, 1.1)
    crop_p: float = 0.0
    crop_side_range: FloatRange = (0.8, 1.0)
    erase_p: float = 0.0
    erase_area_range: FloatRange = (0.02, 0.2)
    brightness_p: float = 0.5
    brightness_range: FloatRange = (0.8, 1.2)
    saturation_p: float = 0.5
    saturation_range: FloatRange = (0.8, 1.2)
    fill_value: int = 0
    reflect_border: bool = False

    @classmethod
    def for_photos(cls) -> AugmentConfig:
        """Stronger settings for natural photos, whose meaning survives mirroring."""
        return cls(
            hflip_p=0.5,
            rotation_deg=15.0,
            scale_range=(0.8, 1.2),
            crop_p=0.5,
            crop_side_range=(0.6, 1.0),
            erase_p=0.25,
            brightness_range=(0.7, 1.3),
            saturation_range=(0.7, 1.3),
            reflect_border=True,
        )

    def __post_init__(self) -> None:
        for name in (
            "hflip_p",
            "vflip_p",
            "rotate_p",
            "scale_p",
            "crop_p",
            "erase_p",
            "brightness_p",
            "saturation_p",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1]")
        if not 0.0 <= self.rotation_deg <= 180.0:
            raise ConfigError("rotation_deg must be in [0, 180]")
        if not 0 <= self.fill_value <= 255:
            raise ConfigError("fill_value must be in 0..255")
        # Sizes must stay above zero; a colour factor of 0 (black, grey) is still valid.
        _check_range("scale_range", self.scale_range, high=math.inf, zero_ok=False)
        _check_range("crop_side_range", self.crop_side_range, high=1.0, zero_ok=False)
        _check_range("erase_area_range", self.erase_area_range, high=1.0, zero_ok=False)
        _check_range("brightness_range", self.brightness_range, high=math.inf, zero_ok=True)
        _check_range("saturation_range", self.saturation_range, high=math.inf, zero_ok=True)


class Augmenter:
    """Applies an :class:`AugmentConfig` with its own seeded random generator."""

    def __init__(self, config: AugmentConfig | None = None, *, seed: int | None = None) -> None:
        self.config = config or AugmentConfig()
        self._rng = np.random.default_rng(seed)

    def augment(self, image: np.ndarray) -> np.ndarray:
        """A randomly changed copy of a uint8 (H, W), (H, W, 1) or BGR (H, W, 3) image.

        The result has the shape and dtype of the input. Order: flips, crop, rotation
        and scale, brightness, saturation, erasing (last, so the noise is not tinted).
        """
        work = _checked(image)
        cfg = self.config
        if self._coin(cfg.hflip_p):
            work = cv2.flip(work, 1)
        if self._coin(cfg.vflip_p):
            work = cv2.flip(work, 0)
        if self._coin(cfg.crop_p):
            work = self._crop(work)
        rotate, zoom = self._coin(cfg.rotate_p), self._coin(cfg.scale_p)
        if rotate or zoom:
            angle = self._uniform((-cfg.rotation_deg, cfg.rotation_deg)) if rotate else 0.0
            factor = self._uniform(cfg.scale_range) if zoom else 1.0
            work = self._warp(work, angle, factor)
        if self._coin(cfg.brightness_p):
            work = cv2.convertScaleAbs(work, alpha=self._uniform(cfg.brightness_range))
        if self._coin(cfg.saturation_p):
            work = _saturate(work, self._uniform(cfg.saturation_range))
        if self._coin(cfg.erase_p):
            work = self._erase(work)
        return np.ascontiguousarray(work).reshape(image.shape)

    def _coin(self, p: float) -> bool:
        return bool(self._rng.random() < p)

    def _uniform(self, bounds: FloatRange) -> float:
        return float(self._rng.uniform(bounds[0], bounds[1]))

    def _crop(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        side = self._uniform(self.config.crop_side_range)
        crop_w = min(width, max(1, round(width * side)))
        crop_h = min(height, max(1, round(height * side)))
        x = int(self._rng.integers(0, width - crop_w + 1))
        y = int(self._rng.integers(0, height - crop_h + 1))
        window = image[y : y + crop_h, x : x + crop_w]
        return cv2.resize(window, (width, height), interpolation=cv2.INTER_LINEAR)

    def _warp(self, image: np.ndarray, angle_deg: float, factor: float) -> np.ndarray:
        height, width = image.shape[:2]
        centre = ((width - 1) / 2.0, (height - 1) / 2.0)
        matrix = cv2.getRotationMatrix2D(centre, angle_deg, factor)
        border = cv2.BORDER_REFLECT_101 if self.config.reflect_border else cv2.BORDER_CONSTANT
        fill = float(self.config.fill_value)
        return cv2.warpAffine(
            image,
            matrix,
            (width, height),
            flags=cv2.INTER_LINEAR,
            borderMode=border,
            borderValue=(fill, fill, fill, fill),
        )

    def _erase(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        area = self._uniform(self.config.erase_area_range) * height * width
        aspect = math.exp(
            self._uniform((math.log(_ERASE_ASPECT_RANGE[0]), math.log(_ERASE_ASPECT_RANGE[1])))
        )
        erase_h = min(height, max(1, round(math.sqrt(area * aspect))))
        erase_w = min(width, max(1, round(math.sqrt(area / aspect))))
        y = int(self._rng.integers(0, height - erase_h + 1))
        x = int(self._rng.integers(0, width - erase_w + 1))
        out = image.copy()
        noise_shape = (erase_h, erase_w, *image.shape[2:])
        out[y : y + erase_h, x : x + erase_w] = self._rng.integers(
            0, 256, size=noise_shape, dtype=np.uint8
        )
        return out


def _check_range(name: str, bounds: FloatRange, *, high: float, zero_ok: bool) -> None:
    lo, hi = bounds
    low_ok = lo >= 0.0 if zero_ok else lo > 0.0
    if not (low_ok and lo <= hi <= high):
        raise ConfigError(f"{name} must be an ordered range within [0, {high}], got {bounds}")


def _checked(image: np.ndarray) -> np.ndarray:
    """The image as (H, W) or (H, W, 3), the layouts OpenCV keeps through every op."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.size == 0:
        raise PreprocessError("expected a non-empty uint8 image", reason="bad_image")
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3):
        return image
    raise PreprocessError(f"expected HxW, HxWx1 or HxWx3, got {image.shape}", reason="bad_image")


def _saturate(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the image's own grey: 0 gives grey, 1 the input, above 1 more colour."""
    if image.ndim == 2:
        return image  # grey has no saturation to change
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(image, factor, gray, 1.0 - factor, 0.0)
