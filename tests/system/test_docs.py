"""README.md is checked against the code it documents."""

from __future__ import annotations

from pathlib import Path

from fedge.docs import SECTIONS, generated_section, render_readme

README = Path(__file__).resolve().parents[2] / "README.md"


def test_generated_readme_sections_match_the_code() -> None:
    text = README.read_text()
    for name, render in SECTIONS.items():
        assert f"<!-- generated:{name} -->" in text
        assert generated_section(text, name).strip() == render().strip(), name
    assert render_readme(text) == text, "README.md drifted: run `python -m fedge.docs`"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    text = README.read_text()
    first_block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block
    assert "make test" in first_block
    ci = (README.parent / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"


def _readme_commands(program: str) -> list[list[str]]:
    """Every command line in README's sh blocks that runs ``program``, as argv."""
    import re
    import shlex

    commands = []
    blocks = README.read_text().split("```sh")[1:]
    for block in blocks:
        body = block.split("```", 1)[0]
        logical = body.replace("\\\n", " ")
        for line in logical.splitlines():
            code = line.split(" #", 1)[0].strip()
            for part in code.split("&&"):
                words = shlex.split(part.strip())
                if words and words[0].endswith(program):
                    commands.append(words)
    inline = re.findall(rf"`({program} [^`]+)`", README.read_text())
    commands.extend(shlex.split(c) for c in inline if "..." not in c and "<" not in c)
    return commands


def test_every_fedge_command_in_the_readme_parses() -> None:
    from click.testing import CliRunner

    from fedge.cli import cli

    commands = _readme_commands("fedge")
    assert len(commands) >= 10
    for words in commands:
        # --help after the real arguments: click parses and checks every option name and
        # subcommand first, then prints the help instead of running anything.
        result = CliRunner().invoke(cli, [*words[1:], "--help"])
        assert result.exit_code == 0, f"{' '.join(words)}: {result.output}"


def test_every_script_the_readme_names_exists() -> None:
    root = README.parent
    for program in (
        "bench/inference.py",
        "bench/federated.py",
        "bench/transfer.py",
        "bench/make_models.py",
        "deploy/pi/install.sh",
    ):
        assert f"{program}" in README.read_text(), program
        assert (root / program).exists(), program
    makefile = (root / "Makefile").read_text()
    assert "\ndemo:" in makefile
    assert "\ntest:" in makefile
