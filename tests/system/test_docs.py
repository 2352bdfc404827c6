"""README.md is checked against the code it documents."""

from __future__ import annotations

from pathlib import Path

from fedge.docs import SECTIONS, render_readme

README = Path(__file__).resolve().parents[2] / "README.md"


def test_generated_readme_sections_match_the_code() -> None:
    text = README.read_text()
    for name in SECTIONS:
        assert f"<!-- generated:{name} -->" in text
    assert render_readme(text) == text, "README.md drifted: run `python -m fedge.docs`"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    text = README.read_text()
    first_block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block
    assert "make test" in first_block
    ci = (README.parent / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"
