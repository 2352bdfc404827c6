"""The `fedge` command as a user runs it."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from agent.store import SampleStore
from fedge.cli import cli
from protocol.errors import SignatureError
from protocol.messages.codec import MESSAGE_TYPES
from protocol.signing import load_signing_key, load_verify_key


def test_protocol_schema_prints_valid_json_schema_for_every_kind() -> None:
    result = CliRunner().invoke(cli, ["protocol", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    Draft202012Validator.check_schema(schema)
    kinds = {
        d["properties"]["kind"]["const"]
        for d in schema["$defs"].values()
        if "const" in d.get("properties", {}).get("kind", {})
    }
    assert {t.model_fields["kind"].default for t in MESSAGE_TYPES} <= kinds


def test_protocol_schema_of_one_kind() -> None:
    result = CliRunner().invoke(cli, ["protocol", "schema", "--kind", "ping"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    Draft202012Validator.check_schema(schema)
    Draft202012Validator(schema).validate({"kind": "ping", "command_id": "x"})


def test_unknown_kind_is_a_clear_error() -> None:
    result = CliRunner().invoke(cli, ["protocol", "schema", "--kind", "nope"])
    assert result.exit_code == 2
    assert "unknown kind" in result.output
    assert "Traceback" not in result.output


def test_keys_generate_writes_a_usable_pair_with_safe_permissions(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["keys", "generate", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "k" / "fedge.key", tmp_path / "k" / "fedge.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    signing, verify = load_signing_key(private), load_verify_key(public)
    signed = signing.sign('{"kind": "ping", "command_id": "x"}')
    assert verify.verify(signed) == '{"kind": "ping", "command_id": "x"}'
    tampered = signed.model_copy(update={"body": signed.body.replace("x", "y")})
    with pytest.raises(SignatureError):
        verify.verify(tampered)
    again = runner.invoke(cli, ["keys", "generate", "--out", str(tmp_path / "k")])
    assert again.exit_code == 2
    assert "Traceback" not in again.output


def test_console_script_runs_with_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedge", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "Examples" in result.stdout


def test_agent_config_print_merges_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('agent_id = "pi-7"\ntop_k = 2\nmax_fps = 1.0\npassword = "secret"\n')
    monkeypatch.setenv("FEDGE_MAX_FPS", "5")
    result = CliRunner().invoke(cli, ["agent", "config", "--config", str(config), "--print"])
    assert result.exit_code == 0, result.output
    assert 'agent_id = "pi-7"' in result.output
    assert "top_k = 2" in result.output
    assert "max_fps = 5.0" in result.output  # the environment wins over the file
    assert "secret" not in result.output


def test_agent_config_errors_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('agent_id = "a/b"\n')
    result = CliRunner().invoke(cli, ["agent", "config", "--config", str(config)])
    assert result.exit_code == 2
    assert "agent_id" in result.output
    assert "Traceback" not in result.output


def _leaf_commands() -> list[tuple[str, object]]:
    import click

    leaves: list[tuple[str, object]] = []

    def visit(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        # As make_context does: a command's own context settings (-h for help) apply.
        settings = dict(command.context_settings) if parent is None else {}
        context = click.Context(command, info_name=path[-1], parent=parent, **settings)
        if isinstance(command, click.Group):
            for name in command.list_commands(context):
                sub = command.get_command(context, name)
                assert sub is not None
                visit(sub, [*path, name], context)
        else:
            leaves.append((" ".join(path[1:]), command))

    visit(cli, ["fedge"], None)
    return leaves


@pytest.mark.parametrize("name", [name for name, _ in _leaf_commands()])
def test_every_command_has_help_with_examples(name: str) -> None:
    result = CliRunner().invoke(cli, [*name.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output, name


@pytest.mark.parametrize(
    "args",
    [
        ["agent", "run", "--config", "/nonexistent/agent.toml"],
        ["round", "start", "--deadline", "soon"],
        ["round", "start", "--option", "novalue"],
        ["camera", "/nonexistent/folder"],
        ["demo", "--agents", "1"],
        ["keys", "generate", "--name", "bad/name"],
    ],
    ids=" ".join,
)
def test_user_mistakes_get_one_clear_line_and_no_traceback(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "rror" in result.output


def test_agent_import_reads_a_labelled_folder_into_the_store(tmp_path: Path) -> None:
    from coordinator.reference import digit_images_uint8, digit_png, load_digits_split

    split = load_digits_split()
    folder = tmp_path / "photos"
    for index, image in enumerate(digit_images_uint8(split.x_train[:12])):
        label_dir = folder / str(int(split.y_train[index]))
        label_dir.mkdir(parents=True, exist_ok=True)
        (label_dir / f"{index}.png").write_bytes(digit_png(image))
    (folder / "notes.txt").write_text("not an image")
    config = tmp_path / "agent.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    result = CliRunner().invoke(cli, ["agent", "import", "--config", str(config), str(folder)])
    assert result.exit_code == 0, result.output
    assert "imported" in result.output
    store = SampleStore(tmp_path / "data" / "samples")
    try:
        held = sum(store.counts().values())
    finally:
        store.close()
    assert 10 <= held <= 12  # near-duplicate digits may be refused on the way in
