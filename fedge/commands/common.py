"""What every command module shares: the console they print on, the --config and broker options."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console

__all__ = [
    "BROKER_OPTIONS",
    "CONFIG_OPTION",
    "broker_options",
    "console",
]

console = Console(stderr=True)

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="FEDGE_CONFIG",
    help="TOML config file (keys as in `fedge agent config --print`).",
)


BROKER_OPTIONS = [
    click.option(
        "--broker",
        "broker_url",
        default="mqtt://127.0.0.1:1883",
        show_default=True,
        envvar="FEDGE_BROKER_URL",
        help="Broker URL.",
    ),
    click.option("--username", default=None, envvar="FEDGE_USERNAME"),
    click.option("--password", default=None, envvar="FEDGE_PASSWORD"),
    click.option(
        "--ca-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        envvar="FEDGE_CA_FILE",
        help="CA certificate for mqtts://.",
    ),
    click.option("--fleet", default="default", show_default=True, envvar="FEDGE_FLEET"),
    click.option(
        "--root", "topic_root", default="fedge", show_default=True, envvar="FEDGE_TOPIC_ROOT"
    ),
]


def broker_options(function: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(BROKER_OPTIONS):
        function = option(function)
    return function
