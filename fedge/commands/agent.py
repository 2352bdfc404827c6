"""``fedge agent``: run an edge agent, check its config, import samples, send it commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from fedge.commands.common import (
    CONFIG_OPTION,
    broker_options,
    console,
)
from fedge.control.signing import OPERATOR_KEY_OPTION, operator_signing_key

if TYPE_CHECKING:
    from agent.config import AgentConfig as AgentConfigType

__all__ = ["agent"]


# --- agent ---------------------------------------------------------------------------


@click.group()
def agent() -> None:
    """Run and manage an edge agent."""


def _agent_config(config_path: Path | None, **overrides: object) -> AgentConfigType:
    from agent.config import load_agent_config

    return load_agent_config(config_path, **overrides)


@agent.command("run")
@CONFIG_OPTION
@click.option("--broker", "broker_url", default=None, help="mqtt://host:port or mqtts://...")
@click.option("--agent-id", default=None, help="This agent's id (default: the host name).")
@click.option("--fleet", default=None, help="Fleet name (default: default).")
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    default=None,
    help="A .tflite model to serve.",
)
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Labels file, one per line, in output order.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the outbox and the sample store live.",
)
def agent_run(config_path: Path | None, **overrides: object) -> None:
    """Run the agent until Ctrl-C or SIGTERM.

    Settings come from --config, then FEDGE_* environment variables, then these options.

    \b
    Examples:
      fedge agent run --config /etc/fedge/agent.toml
      fedge agent run --broker mqtt://pi-hub:1883 --model digits.tflite --labels labels.txt
      FEDGE_MAX_FPS=5 fedge agent run --model model.tflite
    """
    from agent.daemon import Agent
    from fedge.control.interrupts import StopSignals

    config = _agent_config(config_path, **overrides)
    with StopSignals() as stops:
        daemon = Agent(config)
        stops.on_stop(daemon.request_stop)
        model = daemon.serving.version if daemon.serving else "no model yet"
        console.print(
            f"agent [bold]{config.agent_id}[/] (fleet {config.fleet}) serving {model}; "
            f"broker {daemon.link.address.redacted()}; frames from "
            f"{', '.join(config.effective_frame_topics)}"
        )
        daemon.run_forever()
        counts = daemon.intake.counts
        console.print(
            f"agent stopped: {counts.received} frames received, {counts.processed} processed, "
            f"{counts.dropped_stale + counts.dropped_rate} dropped, {counts.rejected} rejected"
        )
    stops.exit_if_interrupted()


@agent.command("config")
@CONFIG_OPTION
@click.option("--print", "print_config", is_flag=True, help="Print the effective config as TOML.")
def agent_config(config_path: Path | None, *, print_config: bool) -> None:
    """Check an agent config; with --print, show every effective setting.

    \b
    Examples:
      fedge agent config --config agent.toml --print
    """
    config = _agent_config(config_path)
    if print_config:
        import tomli_w

        values = {k: v for k, v in config.redacted().items() if v is not None}
        click.echo(tomli_w.dumps(values), nl=False)
    else:
        console.print("config is valid")


@agent.command("import")
@CONFIG_OPTION
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def agent_import(config_path: Path | None, folder: Path) -> None:
    """Import labelled samples from FOLDER/<label>/<image> into the agent's sample store.

    Images are cleaned and deduplicated on the way in, as frames are.

    \b
    Examples:
      fedge agent import ./my-labelled-photos --config /etc/fedge/agent.toml
    """
    from agent.store import SampleStore

    config = _agent_config(config_path)
    store = SampleStore(config.data_dir / "samples", max_per_class=config.store_max_per_class)
    try:
        with console.status(f"importing {folder} (decoding and checking every image)..."):
            report = store.import_folder(folder)
        counts = store.counts()
    finally:
        store.close()
    console.print(
        f"imported {report.added} samples, rejected {sum(report.rejected.values())} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(report.rejected.items())) or 'none'}), "
        f"skipped {report.skipped} non-image files"
    )
    console.print("store now holds: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


@agent.command("send")
@broker_options
@OPERATOR_KEY_OPTION
@click.argument("agent_id")
@click.argument("command_json")
def agent_send(
    broker_url: str,
    *,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    fleet: str,
    topic_root: str,
    operator_key: Path | None,
    agent_id: str,
    command_json: str,
) -> None:
    """Send one command (JSON) to a running agent and print its answer.

    A command_id is added when the JSON has none. Kinds: ping, status, load_model,
    set_options, label (see README, "Commands").

    \b
    Examples:
      fedge agent send pi-1 '{"kind": "ping"}'
      fedge agent send pi-1 '{"kind": "set_options", "top_k": 1}' --operator-key operator.key
    """
    import json
    import uuid

    from fedge.control.remote import send_command
    from protocol.errors import FedgeError
    from protocol.messages.codec import decode_message
    from protocol.messages.commands import LabelFrame, LoadModel, Ping, RequestStatus, SetOptions
    from protocol.topics import Topics
    from runtime.mqtt import parse_broker_url

    try:
        fields = json.loads(command_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="COMMAND_JSON") from exc
    if not isinstance(fields, dict):
        raise click.BadParameter("must be a JSON object", param_hint="COMMAND_JSON")
    fields.setdefault("command_id", f"cli-{uuid.uuid4().hex[:12]}")
    kinds = (Ping, RequestStatus, LoadModel, SetOptions, LabelFrame)
    try:
        command = decode_message(json.dumps(fields), kinds)
    except FedgeError as exc:
        raise click.BadParameter(str(exc), param_hint="COMMAND_JSON") from exc
    topics = Topics(root=topic_root, fleet=fleet)
    with console.status(f"waiting for {agent_id}'s answer..."):
        ack = send_command(
            parse_broker_url(broker_url, username=username, password=password, ca_file=ca_file),
            command_topic=topics.agent_commands(agent_id),
            events_topic=topics.agent_events(agent_id),
            command=command,
            operator_key=operator_signing_key(operator_key),
        )
    if not ack.ok:
        raise click.ClickException(f"{agent_id} refused: {ack.message} ({ack.reason})")
    click.echo(json.dumps({"ok": True, **ack.detail}, sort_keys=True))
