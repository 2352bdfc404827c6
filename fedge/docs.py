"""README sections generated from the code, so the documentation cannot drift from it.

``python -m fedge.docs`` rewrites the marked sections of README.md; a test fails when
README.md differs from what this module generates.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic_settings import BaseSettings

from protocol.chunks import CHUNK_HEADER_BYTES, DEFAULT_MAX_CHUNK_BYTES
from protocol.messages.codec import MESSAGE_TYPES
from protocol.topics import Topics

__all__ = ["SECTIONS", "render_readme"]

_PLACEHOLDERS = {
    "FLEET": "<fleet>",
    "AGENT": "<agent>",
    "CAMERA": "<camera>",
    "VERSION": "<version>",
}
_ROUND, _INDEX = 77, 99


def _topic_rows() -> list[tuple[str, str, str]]:
    t = Topics(fleet="FLEET")
    rows = [
        (t.agent_status("AGENT"), "agent", "retained `agent_status`; birth online, LWT offline"),
        (
            t.agent_commands("AGENT"),
            "anyone",
            "commands: `ping`, `status`, `load_model`, `set_options`, `label`",
        ),
        (t.agent_events("AGENT"), "agent", "`command_ack` and `error` events"),
        (t.agent_results("AGENT"), "agent", "`inference_result`"),
        (t.camera_frames("CAMERA"), "camera", "a bare JPEG/PNG/BMP/WebP or a frame envelope"),
        (t.coordinator_status(), "coordinator", "retained `coordinator_status`"),
        (t.coordinator_commands(), "operator", "`start_rounds`, `stop_rounds`, `ping`, `status`"),
        (t.coordinator_events(), "coordinator", "`command_ack` and `error` events"),
        (t.round_current(), "coordinator", "retained `signed` `round_announcement`"),
        (t.model_manifest("VERSION"), "coordinator", "retained `signed` `model_release`"),
        (t.blob_chunk("SHA", _INDEX), "coordinator", "retained chunk of a content-addressed blob"),
        (t.update_manifest(_ROUND, "AGENT"), "agent", "`update_complete`"),
        (t.update_chunk(_ROUND, "AGENT", _INDEX), "agent", "update chunk (binary)"),
    ]
    return [(_generic(topic), who, what) for topic, who, what in rows]


def _generic(topic: str) -> str:
    for placeholder, generic in _PLACEHOLDERS.items():
        topic = topic.replace(placeholder, generic)
    return topic.replace(f"/{_ROUND}/", "/<round>/").replace(f"/{_INDEX}", "/<index>")


def topic_table() -> str:
    lines = ["| topic | published by | payload |", "| --- | --- | --- |"]
    lines += [f"| `{topic}` | {who} | {what} |" for topic, who, what in _topic_rows()]
    return "\n".join(lines)


def message_table() -> str:
    lines = ["| kind | what it is |", "| --- | --- |"]
    for message_type in MESSAGE_TYPES:
        kind = message_type.model_fields["kind"].default
        summary = (message_type.__doc__ or message_type.__name__).strip().splitlines()[0]
        lines.append(f"| `{kind}` | {summary} |")
    return "\n".join(lines)


def chunking_facts() -> str:
    return (
        f"Default maximum MQTT payload per chunk: {DEFAULT_MAX_CHUNK_BYTES} bytes "
        f"({DEFAULT_MAX_CHUNK_BYTES // 1024} KiB), of which {CHUNK_HEADER_BYTES} bytes are the "
        "chunk header."
    )


def agent_config_table() -> str:
    from agent.config import AgentConfig

    return _config_table(AgentConfig)


def coordinator_config_table() -> str:
    from coordinator.config import CoordinatorConfig

    return _config_table(CoordinatorConfig)


def _config_table(settings_type: type[BaseSettings]) -> str:
    lines = ["| key (TOML) | environment | default |", "| --- | --- | --- |"]
    for name, field in settings_type.model_fields.items():
        if field.default_factory is not None:
            default = "host name" if name == "agent_id" else "computed"
        elif field.default is None or field.default == ():
            default = "unset"
        else:
            default = f"`{field.default}`"
        lines.append(f"| `{name}` | `FEDGE_{name.upper()}` | {default} |")
    return "\n".join(lines)


_PREPROCESS_MEANINGS = {
    "height": "model input height, pixels",
    "width": "model input width, pixels",
    "color": "channel order the model takes",
    "resize": "stretch, or letterbox (keeps the aspect ratio)",
    "pad_value": "letterbox border value, 0..255",
    "invert": "invert light and dark first",
    "normalization": "none, scale (x * scale + offset), zscore or minmax",
    "scale": "for scale",
    "offset": "for scale",
    "mean": "per channel, for zscore",
    "std": "per channel, for zscore",
    "dtype": "the model's input type (a transfer backbone: leave float32)",
}


def _type_name(annotation: object) -> str:
    import enum
    import types
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f"`{m.value}`" for m in annotation)
    if typing.get_origin(annotation) is tuple:
        return "list"
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(args[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    return getattr(annotation, "__name__", str(annotation))


def task_reference() -> str:
    """Every key of a task file, by TOML table, from :class:`protocol.tasks.TaskSpec`."""
    from pydantic import BaseModel

    from protocol.tasks import BuiltinRecipe, KerasRecipe, SplitRecipe, TaskSpec, TransferRecipe

    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def rows(model: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> None:
        for name, field in model.model_fields.items():
            if name in ("schema_version", *skip) or (name == "kind" and prefix == ""):
                continue
            kind = _type_name(field.annotation)
            if field.is_required():
                default = "required"
            elif field.default in ((), None):
                default = "unset"
            else:
                value = getattr(field.default, "value", field.default)
                default = f"`{value}`" if not isinstance(value, BaseModel) else "see below"
            meaning = (field.description or _PREPROCESS_MEANINGS.get(name, "")).replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | {kind} | {default} | {meaning} |")

    rows(TaskSpec, "", skip=("recipe", "preprocess", "training"))
    rows(BuiltinRecipe, "recipe.")
    rows(TransferRecipe, "recipe.", skip=())
    rows(KerasRecipe, "recipe.")
    rows(SplitRecipe, "recipe.")
    from protocol.preprocess import PreprocessSpec
    from protocol.tasks import TrainingDefaults

    rows(PreprocessSpec, "preprocess.", skip=("kind",))
    rows(TrainingDefaults, "training.", skip=("kind",))
    return "\n".join(lines)


def cli_reference() -> str:
    """Every ``fedge`` command with its summary and options, walked from the click tree."""
    import click

    from fedge.cli import cli

    lines: list[str] = []

    def visit(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        # As make_context does: a command's own context settings (-h for help) apply.
        settings = dict(command.context_settings) if parent is None else {}
        context = click.Context(command, info_name=path[-1], parent=parent, **settings)
        if isinstance(command, click.Group):
            for name in sorted(command.list_commands(context)):
                sub = command.get_command(context, name)
                if sub is not None and not sub.hidden:
                    visit(sub, [*path, name], context)
            return
        summary = (command.help or "").strip().split("\n\n")[0].replace("\n", " ")
        lines.extend([f"**`{' '.join(path)}`**: {summary}", ""])
        records = [p.get_help_record(context) for p in command.get_params(context)]
        rows = [r for r in records if r is not None]
        if rows:
            lines.extend(["| option | meaning |", "| --- | --- |"])
            for option, meaning in rows:
                cell = meaning.replace("|", "\\|").replace("\n", " ")
                lines.append(f"| `{option}` | {cell} |")
            lines.append("")

    visit(cli, ["fedge"], None)
    return "\n".join(lines).rstrip()


SECTIONS = {
    "topics": topic_table,
    "messages": message_table,
    "chunking": chunking_facts,
    "agent-config": agent_config_table,
    "coordinator-config": coordinator_config_table,
    "cli": cli_reference,
    "task": task_reference,
}


def _replacer(render: Callable[[], str]) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        return match.group(1) + render().rstrip("\n") + "\n" + match.group(2)

    return replace


def render_readme(text: str) -> str:
    """Replace every ``<!-- generated:NAME -->...<!-- /generated:NAME -->`` block."""
    for name, render in SECTIONS.items():
        pattern = re.compile(
            rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.DOTALL
        )
        text = pattern.sub(_replacer(render), text)
    return text


def generated_section(text: str, name: str) -> str:
    """The current content of one generated block (empty if the block is missing)."""
    match = re.search(
        rf"<!-- generated:{name} -->\n(.*?)<!-- /generated:{name} -->", text, re.DOTALL
    )
    return match.group(1) if match else ""


def main() -> int:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    current = readme.read_text()
    updated = render_readme(current)
    if updated != current:
        readme.write_text(updated)
        sys.stderr.write("README.md updated\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
