"""``fedge dashboard``: the fleet in a browser, live, from any machine with broker access."""

from __future__ import annotations

import ipaddress
import logging
import uuid
from pathlib import Path

import click
from rich.console import Console

from fedge.control.signing import OPERATOR_KEY_OPTION, operator_signing_key
from protocol.errors import ConfigError

__all__ = ["dashboard_command"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
console = Console(stderr=True)


@click.command("dashboard")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="FEDGE_CONFIG",
    help="TOML file with broker_url, username, password, ca_file, fleet, topic_root.",
)
@click.option("--broker", "broker_url", default=None, help="mqtt://host:port or mqtts://...")
@click.option("--fleet", default=None, help="Fleet name (default: default).")
@click.option("--root", "topic_root", default=None, help="Topic root (default: fedge).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token",
    default=None,
    envvar="FEDGE_DASHBOARD_TOKEN",
    help="Round actions need this bearer token (from anywhere); without it, localhost only.",
)
@click.option("--read-only", is_flag=True, help="No round actions at all, for anyone.")
@click.option(
    "--coordinator-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The coordinator's fedge.pub: show only rounds and releases it signed.",
)
@OPERATOR_KEY_OPTION
def dashboard_command(
    *,
    config_path: Path | None,
    broker_url: str | None,
    fleet: str | None,
    topic_root: str | None,
    host: str,
    port: int,
    token: str | None,
    read_only: bool,
    coordinator_key: Path | None,
    operator_key: Path | None,
) -> None:
    """Serve a live web page of the fleet: agents, the current round, plots, cameras.

    The page reads the fleet's MQTT topics as an observer (it publishes nothing) and has
    buttons that start and stop rounds, as `fedge round start` does. Actions are taken
    only from localhost unless --token is set; --read-only turns them off.

    \b
    Examples:
      fedge dashboard --broker mqtt://hub.local:1883        # then open http://127.0.0.1:8080
      fedge dashboard --host 0.0.0.0 --token "$(openssl rand -hex 16)"
    """
    try:
        import uvicorn

        from fedge.dashboard.app import Actions, build_app
    except ImportError as exc:
        raise ConfigError(
            f"the dashboard needs its web stack: pip install 'fedge[dashboard]' ({exc})"
        ) from exc
    from fedge.dashboard.state import FleetView
    from protocol.signing import load_verify_key
    from runtime.mqtt import MqttLink
    from runtime.settings import FedgeSettings, load_settings

    settings = load_settings(
        FedgeSettings, config_path, broker_url=broker_url, fleet=fleet, topic_root=topic_root
    )
    address = settings.broker_address()
    key = load_verify_key(coordinator_key) if coordinator_key else None
    view = FleetView(settings.topics, verify_key=key)
    link = MqttLink(
        address,
        client_id=f"fedge-dashboard-{uuid.uuid4().hex[:8]}",
        clean_session=True,  # an observer: retained messages give it the picture at once
        on_message=view.ingest,
    )
    for topic_filter in view.filters():
        link.subscribe(topic_filter, qos=1)
    link.start()
    try:
        link.wait_connected(CONNECT_TIMEOUT_S)
        actions = Actions(
            broker=address,
            token=token,
            read_only=read_only,
            operator_key=operator_signing_key(operator_key),
        )
        shown = f"[{host}]" if ":" in host else host
        console.print(
            f"dashboard on http://{shown}:{port} for fleet {settings.fleet} on "
            f"{address.redacted()}; actions: {_who_acts(host, token, read_only=read_only)}; "
            "Ctrl-C stops it"
        )
        server = uvicorn.Server(
            uvicorn.Config(
                build_app(view, actions),
                host=host,
                port=port,
                # `fedge -v dashboard` logs every request too.
                log_level="info" if logger.isEnabledFor(logging.INFO) else "warning",
                timeout_graceful_shutdown=2,
            )
        )
        server.run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        link.stop()


def _who_acts(host: str, token: str | None, *, read_only: bool) -> str:
    if read_only:
        return "none (read only)"
    if token:
        return "with the token"
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    suffix = "" if local else " (set --token to act from other machines)"
    return f"from localhost only{suffix}"
