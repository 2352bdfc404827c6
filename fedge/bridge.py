"""A site Mosquitto bridged to the central broker: which topics cross, and the bridge config.

A site (a shop, a farm, a building) runs its own Mosquitto; its agents and cameras connect
to it, and its bridge carries the fedge topics to the central broker where the coordinator
runs. Nothing crosses both ways, so no message can loop between the two brokers:

- out (site -> central): agent status, events and results, update chunks and manifests,
  and coordinator commands sent by an operator at the site;
- in (central -> site): the round announcement, model manifests and blob chunks (all
  retained: Mosquitto keeps the retain flag on what a bridge carries, so the site broker
  holds its own copies for agents that connect later), coordinator status and events, and
  commands for agents;
- camera frames stay at the site unless asked for (``frames=True``): inference runs there.

The pure core is :func:`bridge_topics` and :func:`bridge_config`;
``fedge deploy mosquitto-bridge`` (:data:`mosquitto_bridge`) is its command-line face.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import click

from fedge.deploy import write_private
from protocol.errors import ConfigError, TopicError
from protocol.topics import DEFAULT_FLEET, DEFAULT_ROOT, Topics, validate_id

__all__ = [
    "BridgeTopic",
    "Direction",
    "Remote",
    "bridge_acl",
    "bridge_config",
    "bridge_topics",
    "mosquitto_bridge",
]

logger = logging.getLogger(__name__)

BRIDGE_QOS = 1
DEFAULT_KEEPALIVE_S = 30
# Mosquitto 2.0 backs off between these two (seconds, with jitter) while the link is down.
DEFAULT_RESTART_BASE_S = 5
DEFAULT_RESTART_CAP_S = 60
DEFAULT_TLS_PORT = 8883
DEFAULT_PLAIN_PORT = 1883
SYSTEM_CA_PATH = "/etc/ssl/certs"
_PLACEHOLDER_ID = "x"
_PLACEHOLDER_ROUND = 0


class Direction(StrEnum):
    """Mosquitto's bridge directions, seen from the site broker."""

    OUT = "out"
    IN = "in"


@dataclass(frozen=True, slots=True)
class BridgeTopic:
    direction: Direction
    topic_filter: str


@dataclass(frozen=True, slots=True)
class Remote:
    """The central broker as the site's bridge reaches it."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def _wildcard(topic: str, position: int) -> str:
    """``topic`` with the level at ``position`` (negative: from the end) replaced by ``+``."""
    levels = topic.split("/")
    levels[position] = "+"
    return "/".join(levels)


def bridge_topics(
    topics: Topics, *, results: bool = True, frames: bool = False
) -> tuple[BridgeTopic, ...]:
    """Every filter the bridge carries, each in exactly one direction."""
    out, into = Direction.OUT, Direction.IN
    carried = [
        BridgeTopic(out, topics.all_agent_statuses()),
        BridgeTopic(out, topics.all_agent_events()),
        # <base>/rounds/<round>/updates/# -> <base>/rounds/+/updates/#
        BridgeTopic(out, _wildcard(topics.round_updates(_PLACEHOLDER_ROUND), -3)),
        BridgeTopic(out, topics.coordinator_commands()),
        BridgeTopic(into, topics.round_current()),
        BridgeTopic(into, topics.all_model_manifests()),
        BridgeTopic(into, topics.all_blob_chunks()),
        BridgeTopic(into, topics.coordinator_status()),
        BridgeTopic(into, topics.coordinator_events()),
        BridgeTopic(into, _wildcard(topics.agent_commands(_PLACEHOLDER_ID), -2)),
    ]
    if results:
        carried.append(BridgeTopic(out, topics.all_agent_results()))
    if frames:
        carried.append(BridgeTopic(out, topics.all_camera_frames()))
    return tuple(carried)


def bridge_config(
    topics: Topics,
    *,
    site: str,
    remote: Remote,
    results: bool = True,
    frames: bool = False,
    keepalive_s: int = DEFAULT_KEEPALIVE_S,
    restart_s: tuple[int, int] = (DEFAULT_RESTART_BASE_S, DEFAULT_RESTART_CAP_S),
) -> str:
    """The site broker's bridge section (Mosquitto 2.0), to append to its mosquitto.conf."""
    client_id = _client_id(site)
    lines = [
        f"# fedge bridge: site {site!r} <-> central broker {remote.host}:{remote.port},",
        f"# fleet {topics.fleet!r} under {topics.root!r} (fedge deploy mosquitto-bridge).",
        f"connection {client_id}",
        f"address {remote.host}:{remote.port}",
        "bridge_protocol_version mqttv311",
        # The central Mosquitto recognises a bridge and keeps the retain flag of what it
        # forwards, so retained announcements and chunks are retained at the site too.
        "try_private true",
        # A persistent session on both ends: QoS 1 messages wait on either side while the
        # link is down and are delivered once it is back.
        f"remote_clientid {client_id}",
        f"local_clientid {client_id}-local",
        "cleansession false",
        "local_cleansession false",
        "start_type automatic",
        f"restart_timeout {restart_s[0]} {restart_s[1]}",
        f"keepalive_interval {keepalive_s}",
        # A subscription removed at restart would drop the queued messages with it.
        "bridge_attempt_unsubscribe false",
        # `$SYS/broker/connection/<client id>/state` says 1/0 on both brokers: the link's health.
        "notifications true",
    ]
    if remote.username is not None:
        lines.append(f"remote_username {remote.username}")
    if remote.password is not None:
        lines.append(f"remote_password {remote.password}")
    if remote.tls or remote.ca_file is not None:
        lines += (
            [f"bridge_cafile {remote.ca_file}"]
            if remote.ca_file is not None
            else [f"bridge_capath {SYSTEM_CA_PATH}"]
        )
        lines += ["bridge_tls_version tlsv1.2", "bridge_insecure false"]
    if remote.cert_file is not None:
        lines.append(f"bridge_certfile {remote.cert_file}")
    if remote.key_file is not None:
        lines.append(f"bridge_keyfile {remote.key_file}")
    lines += [
        f"topic {t.topic_filter} {t.direction} {BRIDGE_QOS}"
        for t in bridge_topics(topics, results=results, frames=frames)
    ]
    return "\n".join(lines) + "\n"


def bridge_acl(
    topics: Topics, *, site: str, username: str, results: bool = True, frames: bool = False
) -> str:
    """The central broker's ACL entry for the bridge user: it writes what goes out."""
    # The bridge's own health, published on the central broker (`notifications true`).
    lines = [f"user {username}", f"topic write $SYS/broker/connection/{_client_id(site)}/state"]
    for carried in bridge_topics(topics, results=results, frames=frames):
        access = "write" if carried.direction is Direction.OUT else "read"
        lines.append(f"topic {access} {carried.topic_filter}")
    return "\n".join(lines) + "\n"


def _client_id(site: str) -> str:
    return f"fedge-bridge-{validate_id(site, what='site id')}"


def _parse_address(address: str, *, tls: bool) -> tuple[str, int]:
    host, sep, port_text = address.rpartition(":")
    if not sep:
        return address, DEFAULT_TLS_PORT if tls else DEFAULT_PLAIN_PORT
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 2**16:
        raise ConfigError(f"--central {address!r} is not HOST or HOST:PORT", reason="bad_address")
    return host, int(port_text)


def _existing(path: Path | None, what: str) -> Path | None:
    if path is not None and not path.is_file():
        raise ConfigError(f"{what} {path} does not exist", reason="missing_file")
    return path


@click.command("mosquitto-bridge")
@click.option("--site", required=True, help="This site's id (names the bridge's client ids).")
@click.option(
    "--central", required=True, help="The central broker, HOST or HOST:PORT (8883 with TLS)."
)
@click.option("--fleet", default=DEFAULT_FLEET, show_default=True)
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="Topic root.")
@click.option("--username", default=None, help="The bridge's user on the central broker.")
@click.option(
    "--password",
    envvar="FEDGE_BRIDGE_PASSWORD",
    default=None,
    help="Its password (or FEDGE_BRIDGE_PASSWORD in the environment).",
)
@click.option("--tls", is_flag=True, help="TLS to the central broker, system CA store.")
@click.option(
    "--ca-file", type=click.Path(dir_okay=False, path_type=Path), help="CA for TLS (implies --tls)."
)
@click.option("--cert-file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--results/--no-results", default=True, show_default=True, help="Forward inference results."
)
@click.option("--frames", is_flag=True, help="Forward camera frames too (they stay local).")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here (mode 600) instead of standard output.",
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def mosquitto_bridge(
    *,
    site: str,
    central: str,
    fleet: str,
    root: str,
    username: str | None,
    password: str | None,
    tls: bool,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    results: bool,
    frames: bool,
    out_path: Path | None,
    force: bool,
) -> None:
    """Write a site Mosquitto's bridge to the central broker (fedge topics, QoS 1).

    Install the output as /etc/mosquitto/conf.d/fedge-bridge.conf on the site broker.
    With --username, the ACL entry the central broker needs for that user is printed too.

    \b
    Examples:
      fedge deploy mosquitto-bridge --site shop-1 --central broker.example.net:8883 \\
          --ca-file /etc/mosquitto/certs/ca.crt --username bridge-shop-1 \\
          --out /etc/mosquitto/conf.d/fedge-bridge.conf
      fedge deploy mosquitto-bridge --site lab --central 10.0.0.5:1883
    """
    try:
        topics = Topics(root=root, fleet=fleet)
        validate_id(site, what="site id")
    except TopicError as exc:
        raise ConfigError(str(exc), reason="bad_topics") from exc
    tls = tls or ca_file is not None
    host, port = _parse_address(central, tls=tls)
    remote = Remote(
        host=host,
        port=port,
        username=username,
        password=password,
        tls=tls,
        ca_file=_existing(ca_file, "--ca-file"),
        cert_file=_existing(cert_file, "--cert-file"),
        key_file=_existing(key_file, "--key-file"),
    )
    if password is not None and not tls:
        logger.warning("the bridge password crosses the network in clear text without TLS")
    text = bridge_config(topics, site=site, remote=remote, results=results, frames=frames)
    if out_path is None:
        click.echo(text, nl=False)
    else:
        if out_path.exists() and not force:
            raise ConfigError(f"{out_path} already exists; --force replaces it", reason="exists")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_private(out_path, text)  # it may hold the bridge's password
        click.echo(f"wrote {out_path} (mode 600): the bridge for site {site!r}")
    if username is not None:
        # On standard error when the config itself goes to standard output.
        to_stderr = out_path is None
        click.echo("# add to the central broker's acl file:", err=to_stderr)
        acl = bridge_acl(topics, site=site, username=username, results=results, frames=frames)
        click.echo(acl, nl=False, err=to_stderr)
