"""Pytest plugin: the reference models, generated once per session and cached on disk.

The files come from :func:`coordinator.tflite_export.write_reference_models` (training on
scikit-learn's bundled digits; nothing is downloaded). They are cached under
``$FEDGE_TEST_MODEL_CACHE`` (default ``~/.cache/fedge/test-models``) in a directory named by
a hash of the generating source and the library versions, so a change to either produces
fresh models and repeated local runs skip training. A fresh machine (CI) generates them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import coordinator.reference
import coordinator.tflite_export
from coordinator.tflite_export import ReferenceModels, write_reference_models

__all__ = ["TEST_MODEL_EPOCHS", "reference_models"]

# Enough for >= 0.96 test accuracy on the digits split, in a few seconds of training.
TEST_MODEL_EPOCHS = 20
_CACHE_ENV = "FEDGE_TEST_MODEL_CACHE"
_VERSIONED = ("tensorflow", "keras", "numpy", "scikit-learn")


def _cache_key() -> str:
    digest = hashlib.sha256(f"epochs={TEST_MODEL_EPOCHS}".encode())
    for module in (coordinator.reference, coordinator.tflite_export):
        digest.update(Path(module.__file__ or "").read_bytes())
    for dist in _VERSIONED:
        digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    return digest.hexdigest()[:16]


def _cache_root() -> Path:
    configured = os.environ.get(_CACHE_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "fedge" / "test-models"


def _complete(models: ReferenceModels) -> bool:
    return all(p.is_file() and p.stat().st_size > 0 for p in models.all_paths())


@pytest.fixture(scope="session")
def reference_models() -> ReferenceModels:
    """Paths of the trained digits models (float32, int8, uint8, Keras) and the test models."""
    root = _cache_root()
    final = ReferenceModels(root / _cache_key())
    if _complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the final place and rename, so a crashed or concurrent run never leaves a
    # half-written directory under the final name.
    staging = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        write_reference_models(staging, epochs=TEST_MODEL_EPOCHS)
        # Another session may have finished first; its complete directory is as good as ours.
        if not _complete(final):
            if final.directory.exists():
                shutil.rmtree(final.directory)
            staging.rename(final.directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert _complete(final), f"reference models missing in {final.directory}"
    return final
