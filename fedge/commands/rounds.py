"""``fedge round``: start, stop and watch rounds on a running coordinator."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from fedge.commands.common import broker_options, console
from fedge.commands.search_options import search_options
from fedge.control.signing import OPERATOR_KEY_OPTION, operator_signing_key

if TYPE_CHECKING:
    pass

__all__ = ["round_group"]


# --- rounds -------------------------------------------------------------------------------


@click.group("round")
def round_group() -> None:
    """Start federated rounds and watch them."""


@round_group.command("start")
@broker_options
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
    "--task",
    default=None,
    help="One of the coordinator's tasks (its `tasks` setting), run beside the others.",
)
@click.option(
    "--search",
    "search",
    multiple=True,
    metavar="KEY=V1,V2",
    help="With --task: search these values by successive halving (learning_rate, epochs, "
    "batch_size, proximal_mu, server_lr), then train the winner; --rounds counts them all.",
)
@click.option(
    "--rung-rounds",
    type=click.IntRange(1),
    default=None,
    help="Rounds of each rung of a --search [default: 3].",
)
@click.option(
    "--secure-aggregation",
    is_flag=True,
    help="SecAgg+: the coordinator sees only the sum of the updates (FedAvg, FedAdam, FedYogi).",
)
@click.option(
    "--secagg-threshold",
    type=click.IntRange(2),
    default=None,
    help="Shares needed to rebuild an agent's secret; rounds fail below it [default: 2].",
)
@click.option(
    "--secagg-degree",
    type=click.IntRange(2),
    default=None,
    help="Neighbours each agent shares with on the ring [default: 2 x threshold].",
)
@click.option(
    "--secagg-clip-range",
    type=click.FloatRange(0.0, min_open=True),
    default=None,
    help="Every update coordinate is clipped to [-c, c] before quantisation [default: 1.0].",
)
@click.option(
    "--secagg-quantisation-levels",
    type=click.IntRange(1),
    default=None,
    help="Quantisation steps over [-c, c]; agents x levels must stay below 2^32 [default: 2^20].",
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
@OPERATOR_KEY_OPTION
def round_start(
    broker_url: str,
    *,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    fleet: str,
    topic_root: str,
    operator_key: Path | None,
    **settings: object,
) -> None:
    """Ask the running coordinator to run federated rounds, and wait for its answer.

    \b
    Examples:
      fedge round start --rounds 30 --min-agents 8 --deadline 30s
      fedge round start --strategy fedadam --option eta=0.01 --encoding int8
      fedge round start --secure-aggregation --secagg-threshold 4 --secagg-degree 8
      fedge round start --task door --rounds 20
      fedge round start --task digits_cnn --rounds 10 --search learning_rate=0.05,0.2 \\
          --search epochs=1,2 --rung-rounds 3
      fedge round start --rounds 30 --dp-noise-multiplier 1.0 --dp-clip-norm 0.5 \\
          --dp-target-epsilon 8
      fedge round start --rounds 5 --operator-key keys/operator.key
    """
    from fedge.control.remote import send_command
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
    options.update(search_options(settings))
    options.update(_secagg_options(settings))
    command = StartRounds(
        command_id=_command_id(),
        rounds=int(settings["rounds"]),  # type: ignore[call-overload]
        min_agents=int(settings["min_agents"]),  # type: ignore[call-overload]
        fraction=float(settings["fraction"]),  # type: ignore[arg-type]
        deadline_s=_seconds(str(settings["deadline"])),
        strategy=str(settings["strategy"]),
        options=options,
        task=settings.pop("task"),  # type: ignore[arg-type]
    )
    topics = Topics(root=topic_root, fleet=fleet)
    with console.status("waiting for the coordinator's answer..."):
        ack = send_command(
            parse_broker_url(broker_url, username=username, password=password, ca_file=ca_file),
            command_topic=topics.coordinator_commands(),
            events_topic=topics.coordinator_events(),
            command=command,
            operator_key=operator_signing_key(operator_key),
        )
    if not ack.ok:
        raise click.ClickException(f"coordinator refused: {ack.message} ({ack.reason})")
    if ack.detail.get("search"):
        console.print(
            f"coordinator accepted: a search of {ack.detail['search']} configurations for "
            f"task {command.task} in {command.rounds} rounds of the whole fleet; watch with "
            "`fedge round status --watch`"
        )
        return
    console.print(
        f"coordinator accepted: {command.rounds} rounds of {command.strategy}, "
        f"starting with round {ack.detail.get('next_round')}; "
        "watch with `fedge round status --watch`"
    )


@round_group.command("stop")
@broker_options
@click.option("--reason", default="requested", show_default=True, help="Recorded with the round.")
@click.option("--task", default=None, help="Stop only this task's rounds.")
@OPERATOR_KEY_OPTION
def round_stop(
    broker_url: str,
    *,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    fleet: str,
    topic_root: str,
    reason: str,
    task: str | None,
    operator_key: Path | None,
) -> None:
    """Ask the coordinator to close the running round now and run no further ones.

    The round aggregates what it has if it has its quorum; otherwise it is recorded as
    stopped, with this command's id, user@host and reason.

    \b
    Examples:
      fedge round stop --reason "camera maintenance"
      fedge round stop --operator-key keys/operator.key
    """
    import getpass
    import socket

    from fedge.control.remote import send_command
    from protocol.messages.commands import StopRounds
    from protocol.topics import Topics
    from runtime.mqtt import parse_broker_url

    command = StopRounds(
        command_id=_command_id(),
        reason=reason[:1024],
        requested_by=f"{getpass.getuser()}@{socket.gethostname()}"[:1024],
        task=task,
    )
    topics = Topics(root=topic_root, fleet=fleet)
    with console.status("waiting for the coordinator's answer..."):
        ack = send_command(
            parse_broker_url(broker_url, username=username, password=password, ca_file=ca_file),
            command_topic=topics.coordinator_commands(),
            events_topic=topics.coordinator_events(),
            command=command,
            operator_key=operator_signing_key(operator_key),
        )
    if not ack.ok:
        raise click.ClickException(f"coordinator refused: {ack.message} ({ack.reason})")
    running = "the running round closes now" if ack.detail.get("stopping") else "no round ran"
    console.print(f"coordinator stopping: {running}")


@round_group.command("status")
@broker_options
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
    from fedge.control.remote import show_status
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


def _secagg_options(settings: dict[str, object]) -> dict[str, str | int | float | bool]:
    """--secure-aggregation and the --secagg-* flags as the coordinator's options."""
    values = {k: settings.pop(k) for k in [k for k in settings if k.startswith("secagg_")]}
    if not settings.pop("secure_aggregation"):
        return {}
    chosen = {k: v for k, v in values.items() if v is not None}
    return {"secure_aggregation": True, **chosen}  # type: ignore[dict-item]


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
