"""``fedge demo``: a whole fleet on this machine in one command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from fedge.commands.common import console
from fedge.control.interrupts import INTERRUPTED_EXIT_STATUS

if TYPE_CHECKING:
    pass

__all__ = ["demo"]


# --- demo --------------------------------------------------------------------------------


@click.command("demo")
@click.option(
    "--agents",
    default=4,
    show_default=True,
    type=click.IntRange(2, 32),
    help="Agent processes, each with its own share of the data.",
)
@click.option("--rounds", default=10, show_default=True, type=click.IntRange(1, 200))
@click.option(
    "--deadline",
    default=8.0,
    show_default=True,
    type=click.FloatRange(1.0, 600.0),
    help="Seconds a round waits for a missing agent before closing by quorum.",
)
@click.option(
    "--broker",
    "broker_url",
    default=None,
    help="Use this broker instead of starting the embedded one.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("fedge-demo"),
    show_default=True,
    help="Where data, logs, report.json and accuracy.png go (emptied first).",
)
@click.option("--no-drop", is_flag=True, help="Do not cut an agent off mid-demo.")
def demo(
    agents: int,
    rounds: int,
    deadline: float,
    broker_url: str | None,
    workdir: Path,
    *,
    no_drop: bool,
) -> None:
    """Run a whole fleet on this machine: broker, coordinator, agents, camera, rounds.

    Agents serve live inference on a camera stream of digits while federated rounds
    improve the model they serve; one agent is cut off mid-demo and comes back.

    \b
    Examples:
      fedge demo
      fedge demo --agents 6 --rounds 12
      fedge demo --broker mqtt://127.0.0.1:1883
    """
    from fedge.control.interrupts import StopSignals
    from fedge.demo.run import run_demo
    from fedge.demo.settings import DemoSettings

    settings = DemoSettings(
        agents=agents,
        rounds=rounds,
        deadline_s=deadline,
        broker_url=broker_url,
        workdir=workdir,
        drop_agent=not no_drop,
    )
    with StopSignals() as stops:
        try:
            run_demo(settings, Console(), stops)
        except KeyboardInterrupt:
            console.print("demo interrupted; every process it started has been stopped")
            raise SystemExit(INTERRUPTED_EXIT_STATUS) from None
    stops.exit_if_interrupted()
