"""The ``--operator-key`` option and the key it names, for every command that sends commands.

Below the command packages (the dashboard uses it too). Where agents and the coordinator
are configured with ``operator_keys``, commands must be signed (protocol.operator).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from protocol.signing import SigningKey

__all__ = ["OPERATOR_KEY_OPTION", "operator_signing_key"]

OPERATOR_KEY_OPTION = click.option(
    "--operator-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    envvar="FEDGE_OPERATOR_KEY",
    help="Operator private key: sign the command (needed where operator_keys are set).",
)


def operator_signing_key(path: Path | None) -> SigningKey | None:
    """The operator's private key from ``--operator-key``, if one was given."""
    if path is None:
        return None
    from protocol.signing import load_signing_key

    return load_signing_key(path)
