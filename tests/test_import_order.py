"""The layers import downwards only: protocol <- runtime <- agent | coordinator <- fedge.

Read from the source (every ``import``, also inside functions and under ``TYPE_CHECKING``),
so a lazy import cannot hide an arrow that runs the wrong way. The rules:

- an installed package imports only packages of a lower layer (or itself): agent and
  coordinator share a layer and never import each other; the runtime imports no daemon;
- nothing imports the commands (``fedge.cli``, ``fedge.commands``) but the command line
  itself, its entry point, the README generator that renders its help and the tests;
- nothing outside ``tests/`` imports ``tests``, and the installed packages import neither
  ``tests`` nor ``bench``.

The last test runs the same check on a small synthetic tree that breaks every rule once.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Installed packages, bottom-up; a package may import only those of a lower layer.
LAYERS = {"protocol": 0, "runtime": 1, "agent": 2, "coordinator": 2, "fedge": 3}
SCRIPTS = ("bench", "tests")
COMMANDS = ("fedge.cli", "fedge.commands")
# Who may import the commands: the command line, its entry point, the README generator that
# renders its help, and the tests that drive it.
COMMAND_IMPORTERS = (
    "fedge/cli.py",
    "fedge/commands/",
    "fedge/__main__.py",
    "fedge/docs.py",
    "tests/",
)


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from fedge import cli`` names the commands module in the alias.
            if node.module == "fedge":
                names.extend(f"fedge.{alias.name}" for alias in node.names)
            else:
                names.append(node.module)
    return names


def _is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def violations(root: Path) -> list[str]:
    """Every import under ``root`` that runs against the order, as ``file: imported``."""
    found = []
    for top in (*LAYERS, *SCRIPTS):
        for path in sorted((root / top).rglob("*.py")):
            where = path.relative_to(root).as_posix()
            for name in _imports(path):
                first = name.split(".")[0]
                if first == "tests" and top != "tests":
                    found.append(f"{where}: {name} (only tests import tests)")
                elif top in LAYERS and first == "bench":
                    found.append(f"{where}: {name} (nothing imports the benchmarks)")
                elif top in LAYERS and first in LAYERS and first != top:
                    if LAYERS[first] >= LAYERS[top]:
                        found.append(f"{where}: {name} ({first} is not below {top})")
                elif _is_command(name) and not where.startswith(COMMAND_IMPORTERS):
                    found.append(f"{where}: {name} (nothing imports the commands)")
    return sorted(set(found))


def test_the_repository_imports_downwards_only() -> None:
    assert violations(REPO_ROOT) == []


def test_the_check_reads_every_package_it_guards() -> None:
    for top in (*LAYERS, *SCRIPTS):
        assert any((REPO_ROOT / top).rglob("*.py")), top


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    files = {
        "protocol/ok.py": "import json\n",
        "protocol/up.py": "from runtime.mqtt import MqttLink\n",
        "runtime/daemon.py": "def f():\n    import agent.daemon\n",
        "agent/peer.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from coordinator.rounds import RoundPlan\n"
        ),
        "coordinator/ok.py": "from runtime.settings import load_settings\nfrom protocol import x\n",
        "coordinator/cli.py": "from fedge.commands.rounds import start\n",
        "fedge/camera.py": "from fedge import cli\n",
        "fedge/docs.py": "from fedge.cli import cli\n",
        "fedge/harness.py": "from tests.brokers import free_port\n",
        "bench/run.py": "from tests.brokers import free_port\nfrom fedge.harness import f\n",
        "tests/test_x.py": "from tests.brokers import free_port\nfrom fedge.cli import cli\n",
    }
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_check_fails_on_each_kind_of_offending_import(synthetic: Path) -> None:
    assert violations(synthetic) == [
        "agent/peer.py: coordinator.rounds (coordinator is not below agent)",
        "bench/run.py: tests.brokers (only tests import tests)",
        "coordinator/cli.py: fedge.commands.rounds (fedge is not below coordinator)",
        "fedge/camera.py: fedge.cli (nothing imports the commands)",
        "fedge/harness.py: tests.brokers (only tests import tests)",
        "protocol/up.py: runtime.mqtt (runtime is not below protocol)",
        "runtime/daemon.py: agent.daemon (agent is not below runtime)",
    ]
