"""What every command module shares: the console they print on, the --config option."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

__all__ = ["CONFIG_OPTION", "console"]

console = Console(stderr=True)

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="FEDGE_CONFIG",
    help="TOML config file (keys as in `fedge agent config --print`).",
)
