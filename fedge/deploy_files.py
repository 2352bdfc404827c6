"""Files that ``fedge deploy`` writes: passwords (Mosquitto's own hashing), credentials."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from protocol.errors import ConfigError

PASSWORD_BYTES = 24  # 32 URL-safe characters, 192 bits
MOSQUITTO_PASSWD_TIMEOUT_S = 60.0
PRIVATE_FILE_MODE = 0o600
_PASSWD_TOOL = "mosquitto_passwd"  # noqa: S105 - a program name, not a password


# --- I/O edges ----------------------------------------------------------------------------


def generate_passwords(usernames: Iterable[str]) -> dict[str, str]:
    return {name: secrets.token_urlsafe(PASSWORD_BYTES) for name in usernames}


def _mosquitto_passwd() -> str:
    found = shutil.which(_PASSWD_TOOL) or shutil.which(f"/usr/bin/{_PASSWD_TOOL}")
    if found is None:
        raise ConfigError(
            "mosquitto_passwd not found: install Mosquitto (Debian and Raspberry Pi OS: "
            "`sudo apt-get install mosquitto`), which ships it",
            reason="missing_tool",
        )
    return found


def write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only, from the first byte on."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_password_file(path: Path, passwords: dict[str, str]) -> None:
    """A Mosquitto password file with PBKDF2-SHA512 hashes, made by ``mosquitto_passwd -U``.

    The plain passwords go into a private file that ``-U`` hashes in place, so they never
    appear on a command line (``-b`` would show them to every local user in ``ps``).
    """
    tool = _mosquitto_passwd()
    write_private(path, "".join(f"{user}:{password}\n" for user, password in passwords.items()))
    try:
        done = subprocess.run(
            [tool, "-U", str(path)],
            capture_output=True,
            text=True,
            timeout=MOSQUITTO_PASSWD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        path.unlink(missing_ok=True)
        raise ConfigError(f"{tool} could not hash {path}: {exc}", reason="passwd_failed") from exc
    if done.returncode != 0:
        path.unlink(missing_ok=True)
        raise ConfigError(
            f"{tool} -U {path} failed ({done.returncode}): {done.stderr.strip()}",
            reason="passwd_failed",
        )


def read_agents_file(path: Path) -> list[str]:
    """Agent ids, one a line; blank lines and ``#`` comments are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read agents file {path}: {exc}", reason="unreadable") from exc
    names = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [name for name in names if name]


def _split_names(values: Iterable[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]
