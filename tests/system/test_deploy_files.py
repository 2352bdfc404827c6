"""The deployment files: the Pi install script, the systemd units and the compose files.

``deploy/pi/install.sh`` really runs here, into a temporary root (``FEDGE_INSTALL_ROOT``):
it creates a real virtualenv and installs a copy of this checkout with ``--no-deps``
(``FEDGE_PIP_NO_DEPS=1``). What it does not do there, by design, is create the ``fedge``
user, chown files or talk to systemd; those steps are only checked as printed commands.

The units are checked with ``systemd-analyze verify`` when it is installed (skipped
otherwise) and always parsed as INI for their hardening settings; systemd does not run in
this environment, so the units are never started. No container engine runs here either:
the Dockerfile and the compose files are checked for syntax and content, not built.
"""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_agent_config
from tests.system_packages import ensure_program

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
INSTALL_SH = DEPLOY / "pi" / "install.sh"
UNITS = {
    "agent": DEPLOY / "systemd" / "fedge-agent.service",
    "coordinator": DEPLOY / "systemd" / "fedge-coordinator.service",
}
COMPOSE = DEPLOY / "compose" / "compose.yaml"
EMQX_CLUSTER = DEPLOY / "compose" / "emqx" / "emqx-cluster.yaml"
DOCKERFILE = DEPLOY / "compose" / "Dockerfile"
SOURCE_ITEMS = ("pyproject.toml", "README.md", "protocol", "agent", "coordinator", "fedge")
INSTALL_TIMEOUT_S = 300
QUICK_TIMEOUT_S = 60
PRINT_VERSION = "import importlib.metadata as m; print(m.version('fedge'))"
# Quote and backslash: the installer must escape them in TOML.
PASSWORD = 's3cret "quoted" \\ back'
HARDENING = {
    "ProtectSystem": "strict",
    "ProtectHome": "true",
    "PrivateTmp": "true",
    "NoNewPrivileges": "true",
    "User": "fedge",
    "Type": "simple",
    "Restart": "always",
    "RestartSec": "5",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "20",
}


@dataclass(frozen=True)
class Install:
    root: Path
    source: Path
    key: Path
    result: subprocess.CompletedProcess[str]

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def _run_install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDGE_INSTALL_ROOT": str(root), "FEDGE_PIP_NO_DEPS": "1"}
    return subprocess.run(
        ["bash", str(INSTALL_SH), "--python", sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=INSTALL_TIMEOUT_S,
    )


def _source_copy(dest: Path) -> Path:
    # A copy, so that building the package never writes into the checkout.
    dest.mkdir(parents=True)
    for name in SOURCE_ITEMS:
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, dest / name)
    return dest


def _install_args(source: Path, key: Path, broker: str) -> list[str]:
    return [
        "--broker",
        broker,
        "--agent-id",
        "door-cam",
        "--fleet",
        "lab",
        "--coordinator-key",
        str(key),
        "--username",
        "door",
        "--password",
        PASSWORD,
        "--source",
        str(source),
    ]


def _fresh_install(base: Path, broker: str) -> Install:
    source = _source_copy(base / "src")
    key = base / "fedge.pub"
    key.write_text("not a real key: the installer only copies it\n")
    root = base / "root"
    root.mkdir()
    result = _run_install(root, *_install_args(source, key, broker))
    assert result.returncode == 0, result.stderr
    return Install(root=root, source=source, key=key, result=result)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    return _fresh_install(tmp_path_factory.mktemp("install"), "mqtt://hub.local:1883")


def _read_unit(path: Path) -> configparser.ConfigParser:
    # strict=False: systemd allows repeated keys (Environment=) that strict INI refuses.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


# --- install.sh ----------------------------------------------------------------------


def test_install_script_is_valid_bash() -> None:
    result = subprocess.run(
        ["bash", "-n", str(INSTALL_SH)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert os.access(INSTALL_SH, os.X_OK)
    assert "set -euo pipefail" in INSTALL_SH.read_text()


def test_install_script_passes_shellcheck() -> None:
    shellcheck = ensure_program("shellcheck", ["shellcheck"])
    result = subprocess.run(
        [str(shellcheck), str(INSTALL_SH)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_install_help_lists_options_and_test_switches() -> None:
    result = subprocess.run(
        ["bash", str(INSTALL_SH), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=QUICK_TIMEOUT_S,
    )
    assert result.returncode == 0
    for option in (
        "--broker",
        "--agent-id",
        "--fleet",
        "--coordinator-key",
        "--username",
        "--password",
        "--ca-file",
        "--source",
        "--prefix",
        "--config-dir",
        "--uninstall",
        "--purge",
        "--dry-run",
        "FEDGE_INSTALL_ROOT",
        "FEDGE_PIP_NO_DEPS",
    ):
        assert option in result.stdout, option


def test_install_refuses_an_unknown_option(tmp_path: Path) -> None:
    result = _run_install(tmp_path, "--brokr", "mqtt://x")
    assert result.returncode != 0
    assert "unknown option: --brokr" in result.stderr
    assert not any(tmp_path.iterdir())


def test_dry_run_prints_commands_changes_nothing_and_hides_the_password(tmp_path: Path) -> None:
    key = tmp_path / "fedge.pub"
    key.write_text("key\n")
    root = tmp_path / "root"
    root.mkdir()
    result = _run_install(root, "--dry-run", *_install_args(REPO, key, "mqtt://hub:1883"))
    assert result.returncode == 0, result.stderr
    assert "-m venv" in result.stdout
    assert "--no-deps" in result.stdout
    assert "\\[agent\\]" in result.stdout  # shell-quoted by printf %q: copy-pasteable
    assert "dry run: nothing was changed" in result.stderr
    assert "agent.toml (mode 640, root:fedge)" in result.stdout
    assert "skipped (FEDGE_INSTALL_ROOT=" in result.stdout
    assert "useradd" in result.stdout
    assert "systemctl enable --now fedge-agent.service" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr
    assert not any(root.iterdir())


def test_install_creates_a_venv_with_the_fedge_entry_point(installed: Install) -> None:
    venv = installed.at("/opt/fedge/venv")
    entry_point = venv / "bin" / "fedge"
    assert entry_point.is_file()
    assert os.access(entry_point, os.X_OK)
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", PRINT_VERSION],
        capture_output=True,
        text=True,
        check=True,
        timeout=QUICK_TIMEOUT_S,
    )
    assert version.stdout.strip() == "0.1.0"
    # The system steps are announced, not run, under a test root.
    assert "skipped (FEDGE_INSTALL_ROOT=" in installed.result.stdout
    assert "systemctl enable --now fedge-agent.service" in installed.result.stdout


def test_install_writes_a_private_config_the_agent_accepts(installed: Install) -> None:
    config_path = installed.at("/etc/fedge/agent.toml")
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o640
    assert stat.S_IMODE(installed.at("/etc/fedge").stat().st_mode) == 0o750
    values = tomllib.loads(config_path.read_text())
    assert values["broker_url"] == "mqtt://hub.local:1883"
    assert values["agent_id"] == "door-cam"
    assert values["fleet"] == "lab"
    assert values["username"] == "door"
    assert values["password"] == PASSWORD
    assert values["coordinator_key"] == "/etc/fedge/coordinator.pub"
    assert values["data_dir"] == "/var/lib/fedge"
    assert "ca_file" not in values
    copied_key = installed.at("/etc/fedge/coordinator.pub")
    assert copied_key.read_text() == installed.key.read_text()
    assert "s3cret" not in installed.result.stdout + installed.result.stderr
    config = load_agent_config(config_path)
    assert config.agent_id == "door-cam"
    assert config.password == PASSWORD


def test_install_puts_the_unit_in_place(installed: Install) -> None:
    unit = installed.at("/etc/systemd/system/fedge-agent.service")
    assert unit.read_text() == UNITS["agent"].read_text()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644


def test_reinstall_updates_in_place_and_uninstall_removes(tmp_path: Path) -> None:
    first = _fresh_install(tmp_path, "mqtt://old-hub:1883")
    again = _run_install(first.root, *_install_args(first.source, first.key, "mqtt://new-hub:1883"))
    assert again.returncode == 0, again.stderr
    assert "virtualenv" in again.stderr
    assert "exists: updating it" in again.stderr
    config_path = first.at("/etc/fedge/agent.toml")
    assert tomllib.loads(config_path.read_text())["broker_url"] == "mqtt://new-hub:1883"
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o640
    assert sorted(p.name for p in first.at("/etc/fedge").iterdir()) == [
        "agent.toml",
        "coordinator.pub",
    ]
    assert first.at("/opt/fedge/venv/bin/fedge").is_file()

    # With no settings options the config is kept as it is; only the code is updated.
    config_path.write_text(config_path.read_text() + 'model_version = "v7"\n')
    code_only = _run_install(first.root, "--source", str(first.source))
    assert code_only.returncode == 0, code_only.stderr
    assert "keeping" in code_only.stderr
    assert tomllib.loads(config_path.read_text())["model_version"] == "v7"

    removed = _run_install(first.root, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert "systemctl disable --now fedge-agent.service" in removed.stdout
    assert not first.at("/opt/fedge/venv").exists()
    assert not first.at("/etc/systemd/system/fedge-agent.service").exists()
    assert config_path.is_file()  # kept without --purge

    purged = _run_install(first.root, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not first.at("/etc/fedge").exists()


# --- systemd units -------------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_is_hardened(role: str) -> None:
    unit = _read_unit(UNITS[role])
    service = unit["Service"]
    for key, expected in HARDENING.items():
        assert service.get(key) == expected, key
    assert service["ExecStart"] == (
        f"/opt/fedge/venv/bin/fedge {role} run --config /etc/fedge/{role}.toml"
    )
    state_dir = "fedge" if role == "agent" else "fedge-coordinator"
    assert service["StateDirectory"] == state_dir
    assert service["ReadWritePaths"] == f"/var/lib/{state_dir}"
    assert f"FEDGE_DATA_DIR=/var/lib/{state_dir}" in UNITS[role].read_text()
    assert unit["Unit"]["After"] == "network-online.target"
    assert unit["Unit"]["Wants"] == "network-online.target"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert (service.get("SupplementaryGroups") == "video") == (role == "agent")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("role", sorted(UNITS))
def test_unit_passes_systemd_analyze_verify(role: str, tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point it at one that does.
    true_binary = shutil.which("true")
    assert true_binary is not None
    unit = tmp_path / UNITS[role].name
    unit.write_text(UNITS[role].read_text().replace("/opt/fedge/venv/bin/fedge", true_binary))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=QUICK_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    # Unknown or misspelt keys are only warnings: there must be none.
    assert result.stderr.strip() == ""


# --- containers ----------------------------------------------------------------------


def test_compose_file_describes_the_dev_fleet() -> None:
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"mosquitto", "coordinator", "agent-1", "agent-2"}
    assert services["mosquitto"]["image"] == "eclipse-mosquitto:2"
    mounted = [v.split(":")[0] for v in services["mosquitto"]["volumes"]]
    assert (COMPOSE.parent / mounted[0]).resolve().is_file()
    for name in ("coordinator", "agent-1", "agent-2"):
        service = services[name]
        assert "platform" not in service
        assert service["environment"]["FEDGE_BROKER_URL"] == "mqtt://mosquitto:1883"
        assert service["build"]["dockerfile"] == "deploy/compose/Dockerfile"
        assert (COMPOSE.parent / service["build"]["context"]).resolve() == REPO
        assert any(v.endswith(":/var/lib/fedge") for v in service["volumes"])
    assert services["coordinator"]["build"]["args"]["FEDGE_EXTRAS"] == "train"
    assert services["coordinator"]["command"] == ["coordinator", "run"]
    for name in ("agent-1", "agent-2"):
        assert services[name]["build"]["args"]["FEDGE_EXTRAS"] == "agent"
        assert services[name]["command"] == ["agent", "run"]
        assert services[name]["environment"]["FEDGE_AGENT_ID"] == name


def test_emqx_override_makes_a_two_node_cluster() -> None:
    override = _load_yaml(EMQX_CLUSTER)
    services = override["services"]
    nodes = {name: services[name] for name in ("emqx1", "emqx2")}
    for name, node in nodes.items():
        env = node["environment"]
        assert env["EMQX_NODE__NAME"] == f"emqx@{name}.fedge.local"
        assert env["EMQX_CLUSTER__DISCOVERY_STRATEGY"] == "static"
        for other in nodes:
            assert f"emqx@{other}.fedge.local" in env["EMQX_CLUSTER__STATIC__SEEDS"]
    compose_services = set(_load_yaml(COMPOSE)["services"])
    fedge_services = set(services) - set(nodes)
    assert fedge_services <= compose_services
    for name in fedge_services:
        assert services[name]["environment"]["FEDGE_BROKER_URL"].startswith("mqtt://emqx")
    assert "MQTT 3.1.1" in (EMQX_CLUSTER.parent / "README.md").read_text()


def test_dockerfile_builds_either_role_from_one_image() -> None:
    text = DOCKERFILE.read_text()
    assert [line for line in text.splitlines() if line.startswith("FROM")] == [
        "FROM python:3.11-slim"
    ]
    assert "ARG FEDGE_EXTRAS=agent" in text
    assert 'pip install ".[${FEDGE_EXTRAS}]"' in text
    assert "--platform" not in text.replace("--platform linux/amd64,linux/arm64", "")
    assert 'ENTRYPOINT ["fedge"]' in text
    assert "USER fedge" in text


def test_deploy_readme_says_containers_were_not_run() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "no container" in text
    assert "engine" in text
