"""``fedge coordinator``: run the federated-learning coordinator."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from fedge.commands.common import CONFIG_OPTION, console

if TYPE_CHECKING:
    pass

__all__ = ["coordinator"]


# --- coordinator ---------------------------------------------------------------


@click.group()
def coordinator() -> None:
    """Run the federated-learning coordinator."""


@coordinator.command("run")
@CONFIG_OPTION
@click.option("--broker", "broker_url", default=None, help="mqtt://host:port or mqtts://...")
@click.option("--fleet", default=None, help="Fleet name (default: default).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the state database and the signing key live.",
)
@click.option(
    "--model",
    "model_name",
    type=click.Choice(["digits_cnn", "digits_mlp"]),
    default=None,
    help="Model to train (default: digits_cnn).",
)
@click.option(
    "--task",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A task file (TOML: labels, recipe, preprocessing, training); replaces --model.",
)
def coordinator_run(config_path: Path | None, **overrides: object) -> None:
    """Run the coordinator until Ctrl-C or SIGTERM; rounds start with `fedge round start`.

    On first start it creates a signing key in DATA_DIR/keys; copy fedge.pub to every
    agent (`coordinator_key` in the agent's config).

    \b
    Examples:
      fedge coordinator run --broker mqtt://hub.local:1883
      fedge coordinator run --config /etc/fedge/coordinator.toml
      fedge coordinator run --task door.toml
    """
    from coordinator.config import load_coordinator_config
    from coordinator.daemon import Coordinator
    from fedge.control.interrupts import StopSignals

    config = load_coordinator_config(config_path, **overrides)
    console.print("coordinator starting (building the model takes a few seconds)...")
    with StopSignals() as stops:
        daemon = Coordinator(config)
        stops.on_stop(daemon.request_stop)
        console.print(
            f"coordinator for fleet [bold]{config.fleet}[/] on {daemon.link.address.redacted()}; "
            f"agents need {config.signing_key_path.with_suffix('.pub')}"
        )
        daemon.run_forever()
        console.print("coordinator stopped")
    stops.exit_if_interrupted()
