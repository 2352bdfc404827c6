"""Which files a ``load_model`` command may make the agent read.

Anyone who may publish on the agent's command topic can send ``load_model`` (the broker's
ACL gives that to the operator role and the coordinator only; see README, "Who can send
commands"). Even so the command names a path on the agent's own disk, so the agent reads
only what its configuration put within reach: regular files inside its models
directories (after resolving ``..`` and symlinks), no larger than a limit. A stranger's
``/dev/zero``, ``/etc/shadow`` or a symlink out of the directory is refused with a reason.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path

from protocol.errors import ModelError

__all__ = ["DEFAULT_MAX_MODEL_BYTES", "confined_file"]

DEFAULT_MAX_MODEL_BYTES = 512 * 1024 * 1024


def confined_file(text: str, roots: Sequence[Path], *, max_bytes: int, what: str) -> Path:
    """``text`` as a resolved path to a regular file under one of ``roots``, else ModelError.

    A relative path is taken relative to the first root.
    """
    if "\x00" in text or not text.strip():
        raise ModelError(f"{what} path {text[:200]!r} is not a usable path", reason="bad_path")
    if not roots:
        raise ModelError(f"no models directory is configured for {what}", reason="no_models_dir")
    bases = [root.resolve() for root in roots]
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = bases[0] / candidate
    try:
        resolved = candidate.resolve(strict=True)
        info = resolved.stat()
    except (OSError, RuntimeError) as exc:  # missing, unreadable, a symlink loop
        raise ModelError(f"{what} {text[:200]!r} cannot be read: {exc}", reason="missing") from exc
    if not any(resolved.is_relative_to(base) for base in bases):
        shown = ", ".join(str(base) for base in bases)
        raise ModelError(
            f"{what} {text[:200]!r} is outside the models directories ({shown})",
            reason="outside_models_dir",
        )
    if not stat.S_ISREG(info.st_mode):
        raise ModelError(f"{what} {text[:200]!r} is not a regular file", reason="not_a_file")
    if info.st_size > max_bytes:
        raise ModelError(
            f"{what} {text[:200]!r} has {info.st_size} bytes, more than the {max_bytes} allowed",
            reason="too_large",
        )
    return resolved
