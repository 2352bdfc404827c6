"""``fedge model``: work on serving models offline (merge several into one, or soup them)."""

from __future__ import annotations

from pathlib import Path

import click

from fedge.commands.common import broker_options, console
from fedge.commands.model_soup import read_models, soup

__all__ = ["model_group"]


@click.group("model")
def model_group() -> None:
    """Work on serving .tflite models offline.

    \b
    Examples:
      fedge model merge door.tflite parcel.tflite --out both.tflite
      fedge model soup site-a.tflite site-b.tflite --eval test/ --out door.tflite
      fedge model card r12
      fedge model export r12 --out door.tflite
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

    contents = read_models(models)
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


# The same-task form of merging: models of one task trained apart, averaged.
model_group.add_command(soup)


@model_group.command("card")
@broker_options
@click.argument("version")
@click.option(
    "--coordinator-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    envvar="FEDGE_COORDINATOR_KEY",
    help="The coordinator's public key: check the release's signature.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def card(
    broker_url: str,
    *,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    fleet: str,
    topic_root: str,
    version: str,
    coordinator_key: Path | None,
    as_json: bool,
) -> None:
    """Print the model card of release VERSION: its variants with size, gzip size,
    sparsity, accuracy (central and on the agents' samples) and the invoke latency the
    agents that serve it measured (p50/p95, median over agents).

    \b
    Examples:
      fedge model card r12
      fedge model card r12 --json --coordinator-key keys/coordinator.pub
    """
    import json

    from coordinator.model_card import card_table_markdown
    from fedge.control.model_card import read_model_card
    from protocol.topics import Topics
    from runtime.mqtt import parse_broker_url

    release, rows, verified = read_model_card(
        parse_broker_url(broker_url, username=username, password=password, ca_file=ca_file),
        Topics(root=topic_root, fleet=fleet),
        version,
        coordinator_key=coordinator_key,
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "version": release.version,
                    "round": release.round,
                    "signature_checked": verified,
                    "variants": [row.to_json() for row in rows],
                },
                indent=2,
            )
        )
        return
    checked = "signature checked" if verified else "signature not checked (no --coordinator-key)"
    console.print(
        f"model card of {release.version} ({release.model_name}, round {release.round}; {checked})"
    )
    click.echo(card_table_markdown(rows))


@model_group.command("export")
@broker_options
@click.argument("version")
@click.option(
    "--variant", default="float32", show_default=True, help="Which serving variant to export."
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write the .tflite.",
)
@click.option(
    "--coordinator-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    envvar="FEDGE_COORDINATOR_KEY",
    help="The coordinator's public key: check the release's signature.",
)
def export(
    broker_url: str,
    *,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    fleet: str,
    topic_root: str,
    version: str,
    variant: str,
    out_path: Path,
    coordinator_key: Path | None,
) -> None:
    """Write the serving model of release VERSION (the file agents serve) to a .tflite.

    Its bytes come from the release's retained chunks and are checked against the sha256
    the release names. A transfer release's float32 model is what `fedge model merge` takes.

    \b
    Examples:
      fedge model export r12 --out door.tflite
      fedge model export r12 --variant int8 --out door-int8.tflite --fleet home
    """
    from fedge.control.model_export import fetch_variant
    from protocol.errors import ConfigError
    from protocol.topics import Topics
    from runtime.mqtt import parse_broker_url

    release, chosen, data = fetch_variant(
        parse_broker_url(broker_url, username=username, password=password, ca_file=ca_file),
        Topics(root=topic_root, fleet=fleet),
        version,
        variant,
        coordinator_key=coordinator_key,
    )
    try:
        out_path.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write {out_path}: {exc.strerror}") from exc
    console.print(
        f"{out_path}: release {release.version} variant {chosen.name} "
        f"({chosen.quantization}), {len(data)} bytes, sha256 {chosen.blob.sha256[:12]}"
    )
