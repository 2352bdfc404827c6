"""scikit-image's bundled photos as decoded frames (BGR), and as encoded bytes."""

from __future__ import annotations

import cv2
import numpy as np
import skimage.data


def _photo(name: str) -> np.ndarray:
    """A photo bundled with scikit-image, colour ones in BGR order like decoded frames."""
    image = np.asarray(getattr(skimage.data, name)())
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image


def _encode(image: np.ndarray, ext: str, params: tuple[int, ...] = ()) -> bytes:
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok
    return buffer.tobytes()
