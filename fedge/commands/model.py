"""``fedge model``: work on serving models offline (merge several into one)."""

from __future__ import annotations

from pathlib import Path

import click

from fedge.commands.common import console

__all__ = ["model_group"]


@click.group("model")
def model_group() -> None:
    """Work on serving .tflite models offline.

    \b
    Examples:
      fedge model merge door.tflite parcel.tflite --out both.tflite
    """


@model_group.command("merge")
@click.argument(
    "models",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write the merged multi-head .tflite.",
)
def merge(models: tuple[Path, ...], out_path: Path) -> None:
    """Merge serving models that share a backbone into one multi-head .tflite.

    Each MODEL is a float32 serving model of a transfer release (backbone and head in one
    .tflite) or a model merged before. The result runs the backbone once and gives every
    head's probabilities, each an output named after its task. Models whose backbones differ
    are refused.

    \b
    Examples:
      fedge model merge door.tflite parcel.tflite --out both.tflite
      fedge model merge both.tflite birds.tflite --out three.tflite
    """
    from protocol.errors import ConfigError
    from runtime.merging import merge_models, read_composed

    contents = []
    for path in models:
        try:
            contents.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    merged = merge_models(contents, names=[str(p) for p in models])
    try:
        out_path.write_bytes(merged)
    except OSError as exc:
        raise ConfigError(f"cannot write {out_path}: {exc.strerror}") from exc
    heads = read_composed(merged).heads
    console.print(f"{out_path}: {len(merged)} bytes, one backbone, {len(heads)} outputs")
    for head in heads:
        console.print(
            f"  {head.name}: {', '.join(head.labels) or f'{head.weights[-1].size} classes'}"
        )
