"""The one entry point, ``fedge``. Subcommands import what they need only when they run."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fedge.commands.common import console
from fedge.control.interrupts import INTERRUPTED_EXIT_STATUS
from protocol.errors import FedgeError

if TYPE_CHECKING:
    pass

__all__ = ["main"]


class _FedgeGroup(click.Group):
    """Turns a FedgeError into one clear line and exit status 2: no traceback for user mistakes.

    A Ctrl-C that reaches this far ends the command with status 130, as the shell expects.
    """

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except FedgeError as exc:
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise SystemExit(2) from exc
        except KeyboardInterrupt:
            # Ctrl-C before a command installed its own handlers: status 130, no traceback.
            console.print("interrupted")
            raise SystemExit(INTERRUPTED_EXIT_STATUS) from None


@click.group(cls=_FedgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """fedge: edge AI agents and federated learning over a plain MQTT broker.

    \b
    Examples:
      fedge broker --port 1883
      fedge keys generate --out keys/
      fedge protocol schema > fedge-messages.schema.json
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.group()
def protocol() -> None:
    """Inspect the wire protocol."""


@protocol.command("schema")
@click.option("--kind", "kind", default=None, help="Print only this message kind's schema.")
def protocol_schema(kind: str | None) -> None:
    """Print the JSON Schema of every fedge message (draft 2020-12).

    \b
    Examples:
      fedge protocol schema > messages.schema.json
      fedge protocol schema --kind round_announcement
    """
    from protocol.messages.codec import message_schema

    schema = message_schema()
    if kind is not None:
        definitions = schema.get("$defs", {})
        matches = {
            name: definition
            for name, definition in definitions.items()
            if definition.get("properties", {}).get("kind", {}).get("const") == kind
        }
        if not matches:
            kinds = sorted(
                str(d["properties"]["kind"]["const"])
                for d in definitions.values()
                if "const" in d.get("properties", {}).get("kind", {})
            )
            raise click.BadParameter(f"unknown kind {kind!r}; known: {', '.join(kinds)}")
        ((_, single),) = matches.items()
        schema = {"$schema": schema["$schema"], "$defs": definitions, **single}
    click.echo(json.dumps(schema, indent=2, sort_keys=True))


@cli.group()
def keys() -> None:
    """Manage Ed25519 keys: the coordinator's signing key, operators' command keys."""


@keys.command("generate")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("keys"),
    show_default=True,
    help="Directory for NAME.key (private, mode 600) and NAME.pub.",
)
@click.option("--name", default="fedge", show_default=True, help="Base name of the key files.")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keys_generate(out_dir: Path, name: str, *, force: bool) -> None:
    """Generate a signing key pair, for the coordinator or for an operator.

    The coordinator's private key stays with it; copy its .pub file to every agent. An
    operator keeps operator.key (for --operator-key) and lists operator.pub in the
    operator_keys setting of agents and coordinator, which then refuse unsigned commands.

    \b
    Examples:
      fedge keys generate --out /etc/fedge/keys
      fedge keys generate --name operator --out ~/.config/fedge
    """
    from protocol.signing import load_verify_key, write_key_pair

    private_path, public_path = write_key_pair(out_dir, name=name, overwrite=force)
    key_id = load_verify_key(public_path).key_id
    console.print(f"wrote [bold]{private_path}[/] (private, mode 600)")
    console.print(f"wrote [bold]{public_path}[/] (public, key id {key_id})")


@cli.command("broker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=1883, show_default=True, type=click.IntRange(1, 65535))
@click.option("--username", default="fedge", show_default=True)
@click.option("--password", default="fedge", show_default=True, envvar="FEDGE_BROKER_PASSWORD")
def broker(host: str, port: int, username: str, password: str) -> None:
    """Run the embedded pure-Python MQTT broker (MQTT 3.1.1) until Ctrl-C.

    Good for a demo or a laptop; use Mosquitto (see deploy/) for anything real.

    \b
    Examples:
      fedge broker --port 1883
    """
    from runtime.broker import run_embedded_broker

    console.print(f"embedded broker on mqtt://{host}:{port} (user {username!r}); Ctrl-C stops it")
    stopped_by = run_embedded_broker(host, port, username=username, password=password)
    if stopped_by == signal.SIGINT:
        raise SystemExit(INTERRUPTED_EXIT_STATUS)


def _register_commands() -> None:
    from fedge.bridge import mosquitto_bridge
    from fedge.camera import camera_command
    from fedge.commands.agent import agent
    from fedge.commands.coordinator import coordinator
    from fedge.commands.demo import demo
    from fedge.commands.model import model_group
    from fedge.commands.rounds import round_group
    from fedge.dashboard.command import dashboard_command
    from fedge.deploy import deploy_group

    deploy_group.add_command(mosquitto_bridge)
    for command in (
        agent,
        coordinator,
        round_group,
        demo,
        camera_command,
        deploy_group,
        dashboard_command,
        model_group,
    ):
        cli.add_command(command)


_register_commands()


def main() -> None:
    cli(prog_name="fedge")


if __name__ == "__main__":  # pragma: no cover
    main()
