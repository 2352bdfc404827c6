"""Programs from the system's package manager that the suite needs, installed when missing.

README's test command must pass on a machine that has only Python and apt: so a fixture that
needs a program (Mosquitto, its clients, a browser) asks :func:`ensure_program`, which finds
it or, as root with apt-get present, installs its Debian package first. Nothing is skipped:
a program that cannot be had fails the test with the command that would install it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

__all__ = ["ensure_program", "find_program"]

APT_TIMEOUT_S = 900
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_APT_LOCK = Path(tempfile.gettempdir()) / "fedge-tests-apt.lock"


def find_program(name: str) -> Path | None:
    """``name`` on PATH, or in an sbin directory that a non-login PATH often lacks."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _apt_get(*args: str) -> bool:
    result = subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        check=False,
        timeout=APT_TIMEOUT_S,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return result.returncode == 0


def _install(packages: Sequence[str]) -> None:
    # One installer at a time, also across test processes started in parallel.
    with _APT_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _apt_get("install", "-y", "-qq", *packages):
            # A fresh machine has no package lists yet.
            _apt_get("update", "-qq")
            _apt_get("install", "-y", "-qq", *packages)


def ensure_program(name: str, packages: Sequence[str]) -> Path:
    """The path of program ``name``; installs ``packages`` with apt-get first if it is missing.

    ``packages`` are installed together (e.g. a broker and its clients), so one fixture's
    install also serves the others that need the same packages.
    """
    found = find_program(name)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        _install(packages)
        found = find_program(name)
    if found is None:
        pytest.fail(
            f"{name.upper()} IS NOT INSTALLED and could not be installed here: "
            f"run `apt-get install -y {' '.join(packages)}` (as root) and try again; "
            "tests that need it are never skipped",
            pytrace=False,
        )
    return found
