"""Training augmentation: deterministic per seed, shape and dtype kept, every op real."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import skimage.data
from sklearn.datasets import load_digits

from agent.augment import AugmentConfig, Augmenter
from protocol.errors import ConfigError, PreprocessError

# Every probability at zero: the base from which a test switches on exactly one op.
NOTHING = AugmentConfig(rotate_p=0.0, scale_p=0.0, brightness_p=0.0, saturation_p=0.0)


def _photo(name: str) -> np.ndarray:
    image = np.asarray(getattr(skimage.data, name)())
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return _photo("chelsea")


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    small = np.rint(load_digits().images[3] * (255.0 / 16.0)).astype(np.uint8)
    return np.asarray(cv2.resize(small, (32, 32), interpolation=cv2.INTER_NEAREST))


def _everything_on() -> AugmentConfig:
    return dataclasses.replace(
        AugmentConfig.for_photos(),
        hflip_p=1.0,
        vflip_p=1.0,
        rotate_p=1.0,
        scale_p=1.0,
        crop_p=1.0,
        erase_p=1.0,
        brightness_p=1.0,
        saturation_p=1.0,
    )


def test_defaults_are_safe_for_digits() -> None:
    config = AugmentConfig()
    assert config.hflip_p == 0.0
    assert config.vflip_p == 0.0
    assert config.erase_p == 0.0
    assert config.crop_p == 0.0
    assert config.rotation_deg == 10.0
    assert config.scale_range == (0.9, 1.1)
    assert config.brightness_range == (0.8, 1.2)


def test_same_seed_same_outputs(chelsea: np.ndarray) -> None:
    first = Augmenter(_everything_on(), seed=1234)
    second = Augmenter(_everything_on(), seed=1234)
    for _ in range(4):
        assert np.array_equal(first.augment(chelsea), second.augment(chelsea))


def test_different_seeds_different_outputs(chelsea: np.ndarray) -> None:
    outputs = [Augmenter(AugmentConfig.for_photos(), seed=seed).augment(chelsea) for seed in (1, 2)]
    assert not np.array_equal(outputs[0], outputs[1])


def test_successive_calls_differ(chelsea: np.ndarray) -> None:
    augmenter = Augmenter(_everything_on(), seed=5)
    assert not np.array_equal(augmenter.augment(chelsea), augmenter.augment(chelsea))


def test_input_is_left_untouched(chelsea: np.ndarray) -> None:
    before = chelsea.copy()
    Augmenter(_everything_on(), seed=3).augment(chelsea)
    assert np.array_equal(chelsea, before)


@pytest.mark.parametrize("layout", ["bgr", "gray", "gray1"])
@pytest.mark.parametrize("config", [AugmentConfig(), AugmentConfig.for_photos(), _everything_on()])
def test_shape_and_dtype_are_kept(chelsea: np.ndarray, layout: str, config: AugmentConfig) -> None:
    image = chelsea if layout == "bgr" else cv2.cvtColor(chelsea, cv2.COLOR_BGR2GRAY)
    if layout == "gray1":
        image = image[:, :, np.newaxis]
    augmenter = Augmenter(config, seed=11)
    for _ in range(3):
        out = augmenter.augment(image)
        assert out.shape == image.shape
        assert out.dtype == np.uint8


def test_tiny_images_survive_every_op() -> None:
    augmenter = Augmenter(_everything_on(), seed=0)
    for shape in [(1, 1), (2, 3, 3), (3, 1, 1)]:
        image = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
        assert augmenter.augment(image).shape == shape


def test_nothing_enabled_returns_the_image(chelsea: np.ndarray, digit: np.ndarray) -> None:
    augmenter = Augmenter(NOTHING, seed=0)
    assert np.array_equal(augmenter.augment(chelsea), chelsea)
    assert np.array_equal(augmenter.augment(digit), digit)


@pytest.mark.parametrize(
    "switch",
    [
        {"hflip_p": 1.0},
        {"vflip_p": 1.0},
        {"rotate_p": 1.0},
        {"scale_p": 1.0, "scale_range": (1.2, 1.3)},
        {"crop_p": 1.0, "crop_side_range": (0.5, 0.7)},
        {"erase_p": 1.0},
        {"brightness_p": 1.0, "brightness_range": (0.5, 0.6)},
        {"saturation_p": 1.0, "saturation_range": (0.2, 0.4)},
    ],
    ids=lambda switch: next(iter(switch)),
)
def test_each_op_changes_a_photo(chelsea: np.ndarray, switch: dict[str, object]) -> None:
    config = dataclasses.replace(NOTHING, **switch)  # type: ignore[arg-type]
    out = Augmenter(config, seed=21).augment(chelsea)
    assert out.shape == chelsea.shape
    assert not np.array_equal(out, chelsea)


@pytest.mark.parametrize(
    "switch",
    [{"hflip_p": 1.0}, {"rotate_p": 1.0}, {"scale_p": 1.0}, {"crop_p": 1.0}, {"erase_p": 1.0}],
    ids=lambda switch: next(iter(switch)),
)
def test_each_op_changes_a_digit(digit: np.ndarray, switch: dict[str, object]) -> None:
    config = dataclasses.replace(NOTHING, **switch)  # type: ignore[arg-type]
    assert not np.array_equal(Augmenter(config, seed=8).augment(digit), digit)


def test_flips_mirror_exactly(chelsea: np.ndarray) -> None:
    both = Augmenter(dataclasses.replace(NOTHING, hflip_p=1.0, vflip_p=1.0), seed=0)
    assert np.array_equal(both.augment(chelsea), chelsea[::-1, ::-1])


def test_brightness_scales_and_saturates(chelsea: np.ndarray) -> None:
    config = dataclasses.replace(NOTHING, brightness_p=1.0, brightness_range=(1.5, 1.5))
    out = Augmenter(config, seed=0).augment(chelsea)
    expected = np.clip(np.rint(chelsea.astype(np.float64) * 1.5), 0, 255).astype(np.uint8)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert out.max() == 255


def test_zero_saturation_gives_grey(chelsea: np.ndarray) -> None:
    config = dataclasses.replace(NOTHING, saturation_p=1.0, saturation_range=(0.0, 0.0))
    out = Augmenter(config, seed=0).augment(chelsea)
    assert np.array_equal(out[:, :, 0], out[:, :, 1])
    assert np.array_equal(out[:, :, 1], out[:, :, 2])
    assert np.array_equal(out[:, :, 0], cv2.cvtColor(chelsea, cv2.COLOR_BGR2GRAY))


def test_erasing_covers_an_area_within_its_range(chelsea: np.ndarray) -> None:
    config = dataclasses.replace(NOTHING, erase_p=1.0, erase_area_range=(0.05, 0.1))
    augmenter = Augmenter(config, seed=4)
    pixels = chelsea.shape[0] * chelsea.shape[1]
    for _ in range(10):
        changed = np.any(augmenter.augment(chelsea) != chelsea, axis=2)
        rows, cols = np.nonzero(changed)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.5 * 0.05 * pixels <= box <= 1.1 * 0.1 * pixels


def test_rotation_turns_about_the_centre() -> None:
    config = dataclasses.replace(NOTHING, rotate_p=1.0, rotation_deg=45.0)
    photo = cv2.resize(_photo("camera"), (65, 65), interpolation=cv2.INTER_AREA)
    augmenter = Augmenter(config, seed=2)
    for _ in range(5):
        out = augmenter.augment(photo)
        assert out[32, 32] == photo[32, 32]
        assert not np.array_equal(out, photo)


@pytest.mark.parametrize("reflect", [False, True])
def test_zooming_out_fills_the_border_as_configured(chelsea: np.ndarray, reflect: bool) -> None:
    config = dataclasses.replace(
        NOTHING, scale_p=1.0, scale_range=(0.5, 0.5), fill_value=9, reflect_border=reflect
    )
    out = Augmenter(config, seed=0).augment(chelsea)
    border = np.concatenate([out[:50].reshape(-1, 3), out[-50:].reshape(-1, 3)])
    assert bool(np.all(border == 9)) == (not reflect)


@pytest.mark.parametrize(
    "bad",
    [
        {"hflip_p": 1.5},
        {"rotate_p": -0.1},
        {"rotation_deg": 200.0},
        {"scale_range": (1.2, 0.8)},
        {"scale_range": (0.0, 1.0)},
        {"crop_side_range": (0.5, 1.5)},
        {"erase_area_range": (0.0, 0.1)},
        {"brightness_range": (-0.1, 1.0)},
        {"fill_value": 256},
    ],
)
def test_impossible_configs_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(AugmentConfig(), **bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "image",
    [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4), np.uint8)],
)
def test_unusable_arrays_are_refused(image: np.ndarray) -> None:
    with pytest.raises(PreprocessError):
        Augmenter(seed=0).augment(image)
