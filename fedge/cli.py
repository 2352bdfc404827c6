"""The one entry point, ``fedge``. Subcommands import what they need only when they run."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from fedge.interrupts import INTERRUPTED_EXIT_STATUS
from protocol.errors import FedgeError

if TYPE_CHECKING:
    from agent.config import AgentConfig as AgentConfigType

__all__ = ["main"]

console = Console(stderr=True)


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
    """Manage the coordinator's Ed25519 signing keys."""


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
    """Generate a signing key pair for the coordinator.

    The private key stays with the coordinator; copy the .pub file to every agent.

    \b
    Examples:
      fedge keys generate --out /etc/fedge/keys
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


# --- agent ---------------------------------------------------------------------------

_CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="FEDGE_CONFIG",
    help="TOML config file (keys as in `fedge agent config --print`).",
)


@cli.group()
def agent() -> None:
    """Run and manage an edge agent."""


def _agent_config(config_path: Path | None, **overrides: object) -> AgentConfigType:
    from agent.config import load_agent_config

    return load_agent_config(config_path, **overrides)


@agent.command("run")
@_CONFIG_OPTION
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
    from fedge.interrupts import StopSignals

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
@_CONFIG_OPTION
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
@_CONFIG_OPTION
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


# --- coordinator and rounds ---------------------------------------------------------------


@cli.group()
def coordinator() -> None:
    """Run the federated-learning coordinator."""


@coordinator.command("run")
@_CONFIG_OPTION
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
    from fedge.interrupts import StopSignals

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


_BROKER_OPTIONS = [
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


def _broker_options(function: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_BROKER_OPTIONS):
        function = option(function)
    return function


@cli.group("round")
def round_group() -> None:
    """Start federated rounds and watch them."""


@round_group.command("start")
@_broker_options
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--min-agents", default=1, show_default=True, type=click.IntRange(1))
@click.option(
    "--fraction",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Share of the able agents selected each round.",
)
@click.option(
    "--deadline", default="60s", show_default=True, help="Per-round deadline, e.g. 30s, 2m."
)
@click.option(
    "--strategy",
    default="fedavg",
    show_default=True,
    help="fedavg, fedprox, fedadam, fedyogi, trimmed_mean, median.",
)
@click.option(
    "--encoding",
    "update_encoding",
    type=click.Choice(["float32", "float16", "int8"]),
    default="float32",
    show_default=True,
    help="How agents encode their updates.",
)
@click.option(
    "--epochs",
    default=None,
    type=click.IntRange(1, 1000),
    help="Local epochs (default: the task's, else 1).",
)
@click.option(
    "--lr",
    "learning_rate",
    default=None,
    type=float,
    help="Local learning rate (default: the task's, else 0.05).",
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Strategy option, e.g. --option mu=0.1 --option clip_norm=5.",
)
@click.option(
    "--dp-noise-multiplier",
    type=click.FloatRange(0.0, min_open=True),
    default=None,
    help="DP-FedAvg: Gaussian noise on the sum of clipped updates, in units of the clip norm.",
)
@click.option(
    "--dp-clip-norm",
    type=click.FloatRange(0.0, min_open=True),
    default=None,
    help="DP-FedAvg: every update is clipped to this L2 norm (the first one when adaptive).",
)
@click.option("--dp-adaptive", is_flag=True, help="DP-FedAvg: adapt the clip norm each round.")
@click.option(
    "--dp-target-epsilon",
    type=click.FloatRange(0.0, min_open=True),
    default=None,
    help="DP-FedAvg: stop before a round would spend more than this epsilon.",
)
@click.option(
    "--dp-delta",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=1e-5,
    show_default=True,
    help="DP-FedAvg: the delta epsilon is reported and budgeted at.",
)
def round_start(
    broker_url: str,
    *,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    fleet: str,
    topic_root: str,
    **settings: object,
) -> None:
    """Ask the running coordinator to run federated rounds, and wait for its answer.

    \b
    Examples:
      fedge round start --rounds 30 --min-agents 8 --deadline 30s
      fedge round start --strategy fedadam --option eta=0.01 --encoding int8
      fedge round start --rounds 30 --dp-noise-multiplier 1.0 --dp-clip-norm 0.5 \\
          --dp-target-epsilon 8
    """
    from fedge.remote import send_command
    from protocol.messages.commands import StartRounds
    from protocol.topics import Topics
    from runtime.mqtt import parse_broker_url

    options: dict[str, str | int | float | bool] = {
        "update_encoding": str(settings.pop("update_encoding")),
    }
    # Left out when not given, so the coordinator's task defaults apply.
    for key in ("epochs", "learning_rate"):
        value = settings.pop(key)
        if value is not None:
            options[key] = value  # type: ignore[assignment]
    for item in settings.pop("options"):  # type: ignore[attr-defined]
        key, separator, value = str(item).partition("=")
        if not separator or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        options[key] = _option_value(value)
    options.update(_dp_options(settings))
    command = StartRounds(
        command_id=_command_id(),
        rounds=int(settings["rounds"]),  # type: ignore[call-overload]
        min_agents=int(settings["min_agents"]),  # type: ignore[call-overload]
        fraction=float(settings["fraction"]),  # type: ignore[arg-type]
        deadline_s=_seconds(str(settings["deadline"])),
        strategy=str(settings["strategy"]),
        options=options,
    )
    topics = Topics(root=topic_root, fleet=fleet)
    with console.status("waiting for the coordinator's answer..."):
        ack = send_command(
            parse_broker_url(broker_url, username=username, password=password, ca_file=ca_file),
            command_topic=topics.coordinator_commands(),
            events_topic=topics.coordinator_events(),
            command=command,
        )
    if not ack.ok:
        raise click.ClickException(f"coordinator refused: {ack.message} ({ack.reason})")
    console.print(
        f"coordinator accepted: {command.rounds} rounds of {command.strategy}, "
        f"starting with round {ack.detail.get('next_round')}; "
        "watch with `fedge round status --watch`"
    )


@round_group.command("stop")
@_broker_options
@click.option("--reason", default="requested", show_default=True, help="Recorded with the round.")
def round_stop(
    broker_url: str,
    *,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    fleet: str,
    topic_root: str,
    reason: str,
) -> None:
    """Ask the coordinator to close the running round now and run no further ones.

    The round aggregates what it has if it has its quorum; otherwise it is recorded as
    stopped, with this command's id, user@host and reason.

    \b
    Examples:
      fedge round stop --reason "camera maintenance"
    """
    import getpass
    import socket

    from fedge.remote import send_command
    from protocol.messages.commands import StopRounds
    from protocol.topics import Topics
    from runtime.mqtt import parse_broker_url

    command = StopRounds(
        command_id=_command_id(),
        reason=reason[:1024],
        requested_by=f"{getpass.getuser()}@{socket.gethostname()}"[:1024],
    )
    topics = Topics(root=topic_root, fleet=fleet)
    with console.status("waiting for the coordinator's answer..."):
        ack = send_command(
            parse_broker_url(broker_url, username=username, password=password, ca_file=ca_file),
            command_topic=topics.coordinator_commands(),
            events_topic=topics.coordinator_events(),
            command=command,
        )
    if not ack.ok:
        raise click.ClickException(f"coordinator refused: {ack.message} ({ack.reason})")
    running = "the running round closes now" if ack.detail.get("stopping") else "no round ran"
    console.print(f"coordinator stopping: {running}")


@round_group.command("status")
@_broker_options
@click.option("--watch", is_flag=True, help="Keep showing the live state until Ctrl-C.")
def round_status(
    broker_url: str,
    *,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    fleet: str,
    topic_root: str,
    watch: bool,
) -> None:
    """Show the coordinator's state: round, agents online, updates received, time left.

    \b
    Examples:
      fedge round status
      fedge round status --watch
    """
    from fedge.remote import show_status
    from protocol.topics import Topics
    from runtime.mqtt import parse_broker_url

    show_status(
        parse_broker_url(broker_url, username=username, password=password, ca_file=ca_file),
        Topics(root=topic_root, fleet=fleet),
        console=console,
        watch=watch,
    )


def _seconds(text: str) -> float:
    # "30s", "2m", "500ms": pydantic and isodate read ISO 8601 ("PT30S"), which nobody types;
    # pytimeparse would read "1h30m" too, but as a dependency of every install (agents
    # included) for one option of one command, where these ten lines give a precise error.
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        unit, number = "s", text
    try:
        value = float(number) * units[unit]
    except ValueError as exc:
        raise click.BadParameter(
            f"{text!r} is not a duration like 30s or 2m", param_hint="--deadline"
        ) from exc
    if value <= 0:
        raise click.BadParameter("the deadline must be positive", param_hint="--deadline")
    return value


def _dp_options(settings: dict[str, object]) -> dict[str, str | int | float | bool]:
    """The --dp-* flags as the coordinator's dp_* options; none unless DP was asked for."""
    values = {name: settings.pop(name) for name in [k for k in settings if k.startswith("dp_")]}
    if values["dp_noise_multiplier"] is None and values["dp_clip_norm"] is None:
        return {}
    chosen = {k: v for k, v in values.items() if v is not None and v is not False}
    return {k: v if isinstance(v, bool) else float(v) for k, v in chosen.items()}  # type: ignore[arg-type]


def _option_value(text: str) -> str | int | float | bool:
    if text.lower() in {"true", "false"}:
        return text.lower() == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            continue
    return text


def _command_id() -> str:
    import uuid

    return uuid.uuid4().hex[:16]


# --- demo --------------------------------------------------------------------------------


@cli.command("demo")
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
    from fedge.demo import DemoSettings, run_demo
    from fedge.interrupts import StopSignals

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


def _register_commands() -> None:
    from fedge.bridge import mosquitto_bridge
    from fedge.camera import camera_command
    from fedge.deploy import deploy_group

    deploy_group.add_command(mosquitto_bridge)
    cli.add_command(camera_command)
    cli.add_command(deploy_group)


_register_commands()


def main() -> None:
    cli(prog_name="fedge")


if __name__ == "__main__":  # pragma: no cover
    main()
