"""The labelled sample store: cleaning on ingest, duplicates, reservoir bound, restarts, import."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from sklearn.datasets import load_digits

from agent.cleaning import CleaningPolicy, hamming, perceptual_hash
from agent.sample_records import _reservoir_draw
from agent.store import STORE_DUPLICATE_DISTANCE_BITS, SampleStore
from protocol.errors import ConfigError, StoreError

JOIN_TIMEOUT_S = 60.0


def _encode(image: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok
    return buffer.tobytes()


def _digit_image(raw: np.ndarray) -> np.ndarray:
    gray = np.rint(raw * (255.0 / 16.0)).astype(np.uint8)
    return cv2.resize(gray, (64, 64), interpolation=cv2.INTER_NEAREST)


def _photo(name: str) -> np.ndarray:
    image = np.asarray(getattr(skimage.data, name)())
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    return _encode(image, ".jpg", cv2.IMWRITE_JPEG_QUALITY, quality)


@pytest.fixture(scope="module")
def digits_by_class() -> dict[int, list[np.ndarray]]:
    digits = load_digits()
    by_class: dict[int, list[np.ndarray]] = {}
    for raw, target in zip(digits.images, digits.target, strict=True):
        by_class.setdefault(int(target), []).append(_digit_image(raw))
    return by_class


@pytest.fixture(scope="module")
def distinct_threes(digits_by_class: dict[int, list[np.ndarray]]) -> list[bytes]:
    """50 PNGs of the digit 3, pairwise more than the store's duplicate distance apart."""
    chosen: list[np.ndarray] = []
    hashes: list[int] = []
    for image in digits_by_class[3]:
        phash = perceptual_hash(image)
        if all(hamming(phash, known) > STORE_DUPLICATE_DISTANCE_BITS for known in hashes):
            chosen.append(image)
            hashes.append(phash)
        if len(chosen) == 50:
            break
    assert len(chosen) == 50
    return [_encode(image, ".png") for image in chosen]


def _files_on_disk(root: Path) -> set[Path]:
    return {path for path in (root / "images").rglob("*") if path.is_file()}


def _held(store: SampleStore) -> list[str]:
    return [sample.sample_id for sample in store.samples()]


# -- adding, reading, restarting ----------------------------------------------------------


def test_add_keeps_the_bytes_as_received(
    tmp_path: Path, digits_by_class: dict[int, list[np.ndarray]]
) -> None:
    store = SampleStore(tmp_path / "s")
    digit = _encode(digits_by_class[7][0], ".png")
    photo = _jpeg(_photo("chelsea"))
    first = store.add(digit, label="7", source="cam-1")
    second = store.add(photo, label="cat")
    assert first.stored
    assert second.stored
    assert (first.reason, first.evicted) == (None, None)
    assert first.sample_id is not None
    assert (tmp_path / "s" / "index.sqlite").is_file()
    assert store.counts() == {"7": 1, "cat": 1}

    [seven] = store.samples("7")
    assert seven.sample_id == first.sample_id
    assert seven.path == tmp_path / "s" / "images" / "7" / f"{first.sample_id}.png"
    assert seven.source == "cam-1"
    assert seven.added_at > 0.0
    assert store.load_image(seven) == digit
    [cat] = store.samples("cat")
    assert (cat.path.suffix, cat.source) == (".jpg", "import")
    assert store.load_image(cat) == photo
    assert [s.label for s in store.samples()] == ["7", "cat"]
    assert store.samples("dog") == []
    store.close()


def test_restart_brings_back_samples_and_their_hashes(
    tmp_path: Path, digits_by_class: dict[int, list[np.ndarray]]
) -> None:
    root = tmp_path / "s"
    store = SampleStore(root)
    digit = _encode(digits_by_class[1][0], ".png")
    astronaut = _photo("astronaut")
    assert store.add(digit, label="1").stored
    assert store.add(_encode(astronaut, ".png"), label="person").stored
    before = store.samples()
    store.close()

    reopened = SampleStore(root)
    assert reopened.counts() == {"1": 1, "person": 1}
    assert reopened.samples() == before
    assert reopened.add(digit, label="1").reason == "duplicate"
    assert reopened.add(_jpeg(astronaut, 90), label="person").reason == "duplicate"
    assert reopened.add(_encode(digits_by_class[1][1], ".png"), label="1").stored
    assert reopened.counts() == {"1": 2, "person": 1}
    reopened.close()


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s")
    store.close()
    store.close()  # closing twice is harmless
    with pytest.raises(StoreError) as caught:
        store.counts()
    assert caught.value.reason == "closed"
    with pytest.raises(StoreError):
        store.add(_jpeg(_photo("coffee")), label="cup")


def test_max_per_class_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        SampleStore(tmp_path / "s", max_per_class=0)


def test_load_image_of_a_vanished_file_is_a_store_error(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s")
    assert store.add(_jpeg(_photo("rocket")), label="rocket").stored
    [sample] = store.samples()
    sample.path.unlink()
    with pytest.raises(StoreError) as caught:
        store.load_image(sample)
    assert caught.value.reason == "missing"
    store.close()


# -- cleaning on ingest -------------------------------------------------------------------


def test_exact_and_near_duplicates_are_rejected_per_label(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s")
    astronaut = _photo("astronaut")
    original = _encode(astronaut, ".png")
    assert store.add(original, label="person").stored
    exact = store.add(original, label="person")
    assert (exact.stored, exact.reason, exact.sample_id) == (False, "duplicate", None)
    reencoded = _jpeg(astronaut, 90)
    assert reencoded != original
    assert store.add(reencoded, label="person").reason == "duplicate"
    # The same picture under another label is a different sample.
    assert store.add(original, label="astronaut").stored
    for name in ("coffee", "camera", "coins", "page"):
        assert store.add(_jpeg(_photo(name)), label="person").stored, name
    assert store.counts() == {"astronaut": 1, "person": 5}
    assert len(_files_on_disk(tmp_path / "s")) == 6
    store.close()


def test_policy_distance_decides_what_is_near(
    tmp_path: Path, digits_by_class: dict[int, list[np.ndarray]]
) -> None:
    images = digits_by_class[3]
    hashes = [perceptual_hash(image) for image in images]
    first, second = next(
        (i, j)
        for i in range(len(images))
        for j in range(i + 1, len(images))
        if 2 < hamming(hashes[i], hashes[j]) <= 4
    )
    pair = [_encode(images[first], ".png"), _encode(images[second], ".png")]

    default = SampleStore(tmp_path / "default")
    assert [default.add(data, label="3").stored for data in pair] == [True, True]
    default.close()
    loose = SampleStore(tmp_path / "loose", policy=CleaningPolicy(duplicate_distance=4))
    assert [loose.add(data, label="3").reason for data in pair] == [None, "duplicate"]
    loose.close()


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (np.zeros((48, 64), np.uint8), "blank"),
        (np.full((48, 64, 3), 128, np.uint8), "blank"),
        (np.full((48, 64), 255, np.uint8), "saturated"),
    ],
)
def test_unusable_frames_are_rejected(tmp_path: Path, image: np.ndarray, reason: str) -> None:
    store = SampleStore(tmp_path / "s")
    result = store.add(_encode(image, ".png"), label="x")
    assert (result.stored, result.reason, result.sample_id, result.evicted) == (
        False,
        reason,
        None,
        None,
    )
    assert store.counts() == {}
    assert _files_on_disk(tmp_path / "s") == set()
    store.close()


def test_undecodable_bytes_are_rejected_not_raised(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s")
    jpeg = _jpeg(_photo("coffee"))
    assert store.add(jpeg[: len(jpeg) // 8], label="cup").reason == "undecodable"
    assert store.add(b"this is not an image", label="cup").reason == "undecodable"
    assert store.add(b"", label="cup").reason == "empty"
    assert store.counts() == {}
    store.close()


def test_decodable_formats_without_a_known_signature_are_refused(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s")
    ppm = _encode(_photo("coffee"), ".ppm")
    assert store.add(ppm, label="cup").reason == "unsupported_format"
    tiff = store.add(_encode(_photo("coffee"), ".tiff"), label="cup")
    assert tiff.stored
    assert store.samples("cup")[0].path.suffix == ".tif"
    store.close()


@pytest.mark.parametrize(
    "label", ["", "a/b", "..", ".", "a b", "x" * 65, "\u00fcber", "cat\n", "../etc"]
)
def test_bad_labels_raise(tmp_path: Path, label: str) -> None:
    store = SampleStore(tmp_path / "s")
    with pytest.raises(StoreError) as caught:
        store.add(_jpeg(_photo("coffee")), label=label)
    assert caught.value.reason == "bad_label"
    assert _files_on_disk(tmp_path / "s") == set()
    store.close()


@pytest.mark.parametrize("label", ["x" * 64, "Cat-1.v2_A", "0", "..."])
def test_good_labels_are_folders(tmp_path: Path, label: str) -> None:
    store = SampleStore(tmp_path / "s")
    result = store.add(_jpeg(_photo("coffee")), label=label)
    assert result.stored
    [sample] = store.samples()
    assert sample.path.parent == tmp_path / "s" / "images" / label
    store.close()


# -- reservoir bound ----------------------------------------------------------------------


def test_reservoir_holds_max_per_class_and_evicts(
    tmp_path: Path, distinct_threes: list[bytes]
) -> None:
    root = tmp_path / "s"
    store = SampleStore(root, max_per_class=5, seed=7)
    results = [store.add(image, label="3") for image in distinct_threes]
    assert all(r.stored for r in results[:5])
    assert all(r.stored or r.reason == "reservoir" for r in results)
    evicted = [r.evicted for r in results if r.evicted is not None]
    assert evicted  # some later samples replaced earlier ones
    assert sum(r.reason == "reservoir" for r in results) > 0
    assert store.counts() == {"3": 5}
    held = store.samples("3")
    assert {s.path for s in held} == _files_on_disk(root)
    assert not {s.sample_id for s in held} & set(evicted)
    stored_ids = {r.sample_id for r in results if r.stored}
    assert len(stored_ids) == 5 + len(evicted)
    held_bytes = {store.load_image(s) for s in held}
    assert held_bytes <= set(distinct_threes)
    # Other labels have their own reservoir.
    assert store.add(_jpeg(_photo("chelsea")), label="cat").stored
    assert store.counts() == {"3": 5, "cat": 1}
    store.close()


def test_reservoir_is_deterministic_per_seed(tmp_path: Path, distinct_threes: list[bytes]) -> None:
    def run(name: str, seed: int) -> list[str]:
        store = SampleStore(tmp_path / name, max_per_class=5, seed=seed)
        for image in distinct_threes:
            store.add(image, label="3")
        held = _held(store)
        store.close()
        return held

    first = run("a", seed=7)
    assert run("b", seed=7) == first
    assert run("c", seed=8) != first


def test_reservoir_continues_across_a_restart(tmp_path: Path, distinct_threes: list[bytes]) -> None:
    continuous = SampleStore(tmp_path / "one", max_per_class=5, seed=3)
    outcomes = [continuous.add(image, label="3") for image in distinct_threes]
    expected = _held(continuous)
    continuous.close()

    restarted = SampleStore(tmp_path / "two", max_per_class=5, seed=3)
    resumed = [restarted.add(image, label="3") for image in distinct_threes[:20]]
    restarted.close()
    restarted = SampleStore(tmp_path / "two", max_per_class=5, seed=3)
    resumed += [restarted.add(image, label="3") for image in distinct_threes[20:]]
    assert resumed == outcomes
    assert _held(restarted) == expected
    restarted.close()


def test_reservoir_draws_keep_every_sample_equally_likely() -> None:
    """Algorithm R with the store's draws: each of n items ends up held with chance k/n."""
    n_items, k = 10, 3
    trials = 3000
    held_counts: Counter[int] = Counter()
    for seed in range(trials):
        reservoir: list[int] = []
        for offered in range(1, n_items + 1):
            if len(reservoir) < k:
                reservoir.append(offered)
                continue
            slot = _reservoir_draw(seed, "label", offered)
            if slot < k:
                reservoir[slot] = offered
        held_counts.update(reservoir)
    expected = trials * k / n_items  # 900; one standard deviation is about 25
    assert sorted(held_counts) == list(range(1, n_items + 1))
    assert all(abs(count - expected) < 125 for count in held_counts.values())


# -- crash leftovers and threads ----------------------------------------------------------


def test_open_cleans_up_after_an_interrupted_add(tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = SampleStore(root)
    assert store.add(_jpeg(_photo("coffee")), label="cup").stored
    assert store.add(_jpeg(_photo("rocket")), label="cup").stored
    first, second = store.samples("cup")
    store.close()
    stray = root / "images" / "cup" / "0123abcd.jpg"
    stray.write_bytes(_jpeg(_photo("coins")))
    (root / "images" / "cup" / "feed.png.tmp").write_bytes(b"partial")
    second.path.unlink()

    reopened = SampleStore(root)
    assert reopened.samples() == [first]
    assert _files_on_disk(root) == {first.path}
    # The dropped sample may come back.
    assert reopened.add(_jpeg(_photo("rocket")), label="cup").stored
    reopened.close()


def test_two_stores_on_one_root_share_the_index(tmp_path: Path) -> None:
    """An import run beside the daemon: each sees the other's samples, neither loses files."""
    root = tmp_path / "s"
    daemon = SampleStore(root)
    assert daemon.add(_jpeg(_photo("coffee")), label="cup").stored
    importer = SampleStore(root)
    assert importer.samples() == daemon.samples()
    assert importer.add(_jpeg(_photo("coffee")), label="cup").reason == "duplicate"
    assert importer.add(_jpeg(_photo("rocket")), label="cup").stored
    importer.close()
    assert daemon.counts() == {"cup": 2}
    assert daemon.add(_jpeg(_photo("rocket"), 90), label="cup").reason == "duplicate"
    assert {s.path for s in daemon.samples()} == _files_on_disk(root)
    daemon.close()


def test_adds_from_several_threads(
    tmp_path: Path, digits_by_class: dict[int, list[np.ndarray]]
) -> None:
    store = SampleStore(tmp_path / "s", max_per_class=1000)
    results: dict[int, list[bool]] = {}
    errors: list[BaseException] = []

    def worker(label: int) -> None:
        try:
            images = [_encode(image, ".png") for image in digits_by_class[label][:30]]
            results[label] = [store.add(data, label=str(label)).stored for data in images]
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(label,)) for label in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
        assert not thread.is_alive()
    assert errors == []
    assert store.counts() == {str(label): sum(results[label]) for label in range(4)}
    assert all(sum(stored) >= 28 for stored in results.values())
    assert len(_files_on_disk(tmp_path / "s")) == sum(store.counts().values())
    store.close()


# -- folder import ------------------------------------------------------------------------


@pytest.fixture
def labelled_folder(tmp_path: Path, digits_by_class: dict[int, list[np.ndarray]]) -> Path:
    folder = tmp_path / "photos"
    for label in (0, 1):
        (folder / str(label)).mkdir(parents=True)
        for i, image in enumerate(digits_by_class[label][:3]):
            (folder / str(label) / f"d{i}.png").write_bytes(_encode(image, ".png"))
    zero = folder / "0"
    (zero / "copy.png").write_bytes((zero / "d0.png").read_bytes())  # exact duplicate
    (zero / "LOUD.PNG").write_bytes(_encode(digits_by_class[0][3], ".png"))
    (zero / "blank.png").write_bytes(_encode(np.zeros((64, 64), np.uint8), ".png"))
    (zero / "README.txt").write_text("digits from scikit-learn\n")
    (zero / "nested").mkdir()
    (zero / "nested" / "deep.png").write_bytes(_encode(digits_by_class[0][4], ".png"))
    pets = folder / "pets"
    pets.mkdir()
    (pets / "cat.bmp").write_bytes(_encode(_photo("chelsea"), ".bmp"))
    (pets / "coffee.webp").write_bytes(_encode(_photo("coffee"), ".webp"))
    jpeg = _jpeg(_photo("astronaut"))
    (pets / "corrupt.jpg").write_bytes(jpeg[:200])
    (folder / "bad label").mkdir()
    (folder / "bad label" / "x.jpeg").write_bytes(_jpeg(_photo("rocket")))
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "y.jpg").write_bytes(_jpeg(_photo("coins")))
    (folder / "notes.md").write_text("not a label folder\n")
    return folder


def test_import_folder_adds_cleans_and_counts(tmp_path: Path, labelled_folder: Path) -> None:
    store = SampleStore(tmp_path / "store")
    report = store.import_folder(labelled_folder)
    assert report.added == 9  # 0: d0-d2 and LOUD; 1: d0-d2; pets: cat.bmp, coffee.webp
    assert dict(report.rejected) == {
        "duplicate": 1,
        "blank": 1,
        "undecodable": 1,
        "bad_label": 1,
    }
    # README.txt, nested/, .hidden/ and notes.md
    assert report.skipped == 4
    assert report.evicted == 0
    assert store.counts() == {"0": 4, "1": 3, "pets": 2}
    assert {s.path.suffix for s in store.samples("pets")} == {".bmp", ".webp"}
    assert all(s.source == "import" for s in store.samples())
    assert (
        store.load_image(store.samples("1")[0]) == (labelled_folder / "1" / "d0.png").read_bytes()
    )

    again = store.import_folder(labelled_folder)
    assert again.added == 0
    assert again.rejected["duplicate"] == 9 + 1
    store.close()


def test_import_folder_is_deterministic_and_bounded(tmp_path: Path, labelled_folder: Path) -> None:
    def run(name: str) -> tuple[list[str], int]:
        store = SampleStore(tmp_path / name, max_per_class=2, seed=1)
        report = store.import_folder(labelled_folder)
        held = _held(store)
        assert store.counts() == {"0": 2, "1": 2, "pets": 2}
        store.close()
        return held, report.added + report.rejected.get("reservoir", 0)

    first = run("a")
    assert run("b") == first
    assert first[1] == 9


def test_import_of_a_missing_folder_is_a_store_error(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "store")
    with pytest.raises(StoreError) as caught:
        store.import_folder(tmp_path / "nowhere")
    assert caught.value.reason == "not_a_folder"
    store.close()
