"""Broker credentials and least-privilege ACLs for a production Mosquitto.

The pure core turns a fleet description into Mosquitto ACL text (:func:`acl_text`); the
edges write the password file (hashed by ``mosquitto_passwd``) and a private credentials
file. Every topic filter comes from :class:`protocol.topics.Topics`: filters it does not
offer are derived from a topic it builds, by replacing whole levels.

``fedge deploy mosquitto-acl`` is the command-line face (:data:`deploy_group`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import click

from fedge.deploy_files import (
    _split_names,
    generate_passwords,
    read_agents_file,
    write_password_file,
    write_private,
)
from protocol.errors import ConfigError, FedgeError, TopicError
from protocol.topics import DEFAULT_FLEET, DEFAULT_ROOT, Topics, validate_filter, validate_id

__all__ = [
    "DEFAULT_COORDINATOR_USER",
    "Access",
    "AclRule",
    "ClientAcl",
    "Role",
    "acl_text",
    "agent_rules",
    "camera_rules",
    "coordinator_rules",
    "credentials_toml",
    "deploy_group",
    "fleet_clients",
    "generate_passwords",
    "operator_rules",
    "read_agents_file",
    "write_password_file",
    "write_private",
]

logger = logging.getLogger(__name__)

DEFAULT_COORDINATOR_USER = "coordinator"
_PLACEHOLDER_ROUND = 0
_PLACEHOLDER_ID = "x"


class Access(StrEnum):
    """Mosquitto's ACL access words."""

    READ = "read"
    WRITE = "write"
    READWRITE = "readwrite"


class Role(StrEnum):
    AGENT = "agent"
    COORDINATOR = "coordinator"
    CAMERA = "camera"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class AclRule:
    access: Access
    topic_filter: str


@dataclass(frozen=True, slots=True)
class ClientAcl:
    """One broker user, what it is, and every topic filter it may use."""

    username: str
    role: Role
    rules: tuple[AclRule, ...]


# --- filters Topics does not build itself -----------------------------------------------


def _replace_levels(topic: str, replacements: dict[int, str]) -> str:
    """``topic`` with the levels at the given positions (negative: from the end) replaced."""
    levels = topic.split("/")
    for position, level in replacements.items():
        levels[position] = level
    return validate_filter("/".join(levels))


def _subtree(topic: str, *, drop_levels: int) -> str:
    """The ``#`` filter of the parent ``drop_levels`` levels above ``topic``'s last level."""
    levels = topic.split("/")[: -drop_levels or None]
    return validate_filter("/".join([*levels, "#"]))


def _agent_updates(topics: Topics, agent: str) -> str:
    # <base>/rounds/<round>/updates/<agent>/manifest -> <base>/rounds/+/updates/<agent>/#
    topic = topics.update_manifest(_PLACEHOLDER_ROUND, agent)
    return _replace_levels(topic, {-4: "+", -1: "#"})


def _all_updates(topics: Topics) -> str:
    # <base>/rounds/<round>/updates/# -> <base>/rounds/+/updates/#
    return _replace_levels(topics.round_updates(_PLACEHOLDER_ROUND), {-3: "+"})


def _all_agent_commands(topics: Topics) -> str:
    return _replace_levels(topics.agent_commands(_PLACEHOLDER_ID), {-2: "+"})


# --- rules per role ---------------------------------------------------------------------


def agent_rules(topics: Topics, agent: str) -> tuple[AclRule, ...]:
    """An agent writes only under its own id and reads only what agents consume."""
    w, r = Access.WRITE, Access.READ
    return (
        AclRule(w, topics.agent_status(agent)),
        AclRule(w, topics.agent_events(agent)),
        AclRule(w, topics.agent_results(agent)),
        AclRule(w, _agent_updates(topics, agent)),
        AclRule(r, topics.all_camera_frames()),
        AclRule(r, topics.agent_commands(agent)),
        AclRule(r, topics.round_current()),
        AclRule(r, topics.all_model_manifests()),
        AclRule(r, topics.all_blob_chunks()),
        AclRule(r, topics.coordinator_status()),
        AclRule(r, topics.coordinator_events()),
    )


def coordinator_rules(topics: Topics) -> tuple[AclRule, ...]:
    w, r = Access.WRITE, Access.READ
    return (
        AclRule(w, _subtree(topics.coordinator_status(), drop_levels=1)),
        AclRule(w, topics.round_current()),
        AclRule(w, _subtree(topics.all_model_manifests(), drop_levels=2)),
        AclRule(w, _subtree(topics.all_blob_chunks(), drop_levels=3)),
        AclRule(r, topics.all_agent_statuses()),
        AclRule(r, topics.coordinator_commands()),
        AclRule(r, _all_updates(topics)),
        # Its own retained releases, read back after a reconnect: proof the broker kept them.
        AclRule(r, topics.all_model_manifests()),
    )


def camera_rules(topics: Topics, camera: str) -> tuple[AclRule, ...]:
    return (AclRule(Access.WRITE, topics.camera_frames(camera)),)


def operator_rules(topics: Topics) -> tuple[AclRule, ...]:
    """What `fedge round start` and `fedge round status` need, and agent commands."""
    w, r = Access.WRITE, Access.READ
    return (
        AclRule(w, topics.coordinator_commands()),
        AclRule(r, _subtree(topics.coordinator_status(), drop_levels=1)),
        AclRule(w, _all_agent_commands(topics)),
        AclRule(r, topics.all_agent_events()),
        AclRule(r, topics.all_agent_statuses()),
    )


def fleet_clients(
    topics: Topics,
    *,
    agents: Sequence[str],
    coordinator: str = DEFAULT_COORDINATOR_USER,
    cameras: Sequence[str] = (),
    operator: str | None = None,
) -> tuple[ClientAcl, ...]:
    """Every broker user of one fleet; user names are topic ids, so never ambiguous."""
    if not agents:
        raise ConfigError("name at least one agent", reason="no_agents")
    users = [(Role.COORDINATOR, coordinator)]
    users += [(Role.AGENT, agent) for agent in agents]
    users += [(Role.CAMERA, camera) for camera in cameras]
    users += [(Role.OPERATOR, operator)] if operator is not None else []
    _check_user_names(users)
    return tuple(ClientAcl(name, role, _role_rules(topics, role, name)) for role, name in users)


def _role_rules(topics: Topics, role: Role, name: str) -> tuple[AclRule, ...]:
    match role:
        case Role.COORDINATOR:
            return coordinator_rules(topics)
        case Role.AGENT:
            return agent_rules(topics, name)
        case Role.CAMERA:
            return camera_rules(topics, name)
        case Role.OPERATOR:
            return operator_rules(topics)


def _check_user_names(users: Iterable[tuple[Role, str]]) -> None:
    """User names are topic ids (they name topic levels), each used once."""
    seen: set[str] = set()
    for role, name in users:
        try:
            validate_id(name, what=f"{role} user name")
        except TopicError as exc:
            raise ConfigError(str(exc), reason="bad_user") from exc
        if name in seen:
            raise ConfigError(
                f"user name {name!r} is used twice: every agent, camera, coordinator and "
                "operator needs its own",
                reason="duplicate_user",
            )
        seen.add(name)


def acl_text(
    topics: Topics,
    *,
    agents: Sequence[str],
    coordinator: str = DEFAULT_COORDINATOR_USER,
    cameras: Sequence[str] = (),
    operator: str | None = None,
) -> str:
    """A Mosquitto ``acl_file`` granting each user of the fleet only what its role needs."""
    clients = fleet_clients(
        topics, agents=agents, coordinator=coordinator, cameras=cameras, operator=operator
    )
    return _render_acl(topics, clients)


def _render_acl(topics: Topics, clients: Iterable[ClientAcl]) -> str:
    # No rule precedes the first `user` line: such rules would apply to every client.
    lines = [
        f"# Mosquitto ACL for fleet {topics.fleet!r} under {topics.root!r}.",
        "# Generated by `fedge deploy mosquitto-acl`; anything not granted here is denied.",
    ]
    for client in clients:
        lines += ["", f"# {client.role}", f"user {client.username}"]
        lines += [f"topic {rule.access} {rule.topic_filter}" for rule in client.rules]
    return "\n".join(lines) + "\n"


def credentials_toml(clients: Iterable[ClientAcl], passwords: dict[str, str]) -> str:
    """One ``[clients."<user>"]`` table per user: role, username and password."""
    import tomli_w

    tables = {
        client.username: {
            "role": str(client.role),
            "username": client.username,
            "password": passwords[client.username],
        }
        for client in clients
    }
    warning = "# Broker credentials: keep this file secret (mode 600).\n\n"
    return warning + tomli_w.dumps({"clients": tables})


# --- command line ---------------------------------------------------------------------------


class _UsageFailure(click.ClickException):
    exit_code = 2


class _DeployGroup(click.Group):
    """Turns a FedgeError into one clear line and exit status 2, as the main CLI does."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except FedgeError as exc:
            raise _UsageFailure(str(exc)) from exc


@click.group("deploy", cls=_DeployGroup, context_settings={"help_option_names": ["-h", "--help"]})
def deploy_group() -> None:
    """Production set-up: broker users, passwords and ACLs."""


@deploy_group.command("mosquitto-acl")
@click.option("--agents", "agent_lists", multiple=True, help="Agent ids, comma-separated.")
@click.option(
    "--agents-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="More agent ids, one a line.",
)
@click.option("--coordinator", default=DEFAULT_COORDINATOR_USER, show_default=True)
@click.option("--camera", "cameras", multiple=True, help="A camera user (repeatable).")
@click.option(
    "--operator", default=None, help="A user for `fedge round start` and `fedge round status`."
)
@click.option("--fleet", default=DEFAULT_FLEET, show_default=True)
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="Topic root.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for acl, passwords and credentials.toml.",
)
@click.option("--force", is_flag=True, help="Overwrite existing files (new passwords).")
def mosquitto_acl(out_dir: Path, *, force: bool, **options: Any) -> None:
    """Write DIR/acl, DIR/passwords (hashed) and DIR/credentials.toml (mode 600).

    \b
    Examples:
      fedge deploy mosquitto-acl --agents pi-1,pi-2 --camera door --operator ops --out broker/
      fedge deploy mosquitto-acl --agents-file agents.txt --out broker/
    """
    topics, clients = _clients_from_options(options)
    paths = {name: out_dir / name for name in ("acl", "passwords", "credentials.toml")}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not force:
        raise ConfigError(
            f"{', '.join(existing)} already exist; --force replaces them (and every password)",
            reason="exists",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    passwords = generate_passwords(client.username for client in clients)
    write_password_file(paths["passwords"], passwords)
    write_private(paths["credentials.toml"], credentials_toml(clients, passwords))
    paths["acl"].write_text(_render_acl(topics, clients), encoding="utf-8")
    logger.info("wrote broker ACL for %d users to %s", len(clients), out_dir)
    for client in clients:
        click.echo(f"{client.role:<12} {client.username}")
    click.echo(f"wrote {paths['acl']}, {paths['passwords']} (hashed)")
    click.echo(f"wrote {paths['credentials.toml']} (mode 600): hand each client its password")


def _clients_from_options(options: dict[str, Any]) -> tuple[Topics, tuple[ClientAcl, ...]]:
    agents = _split_names(options["agent_lists"])
    if options["agents_file"] is not None:
        agents += read_agents_file(options["agents_file"])
    try:
        topics = Topics(root=options["root"], fleet=options["fleet"])
    except TopicError as exc:
        raise ConfigError(str(exc), reason="bad_topics") from exc
    clients = fleet_clients(
        topics,
        agents=agents,
        coordinator=options["coordinator"],
        cameras=_split_names(options["cameras"]),
        operator=options["operator"],
    )
    return topics, clients
