"""``fedge model soup``: serving models of one task trained apart become one, by weight averaging.

The evaluation data is a folder of labelled images, ``DIR/<label>/<image>`` as everywhere in
fedge (``DIR/<task>/<label>/<image>`` for a multi-head model). The backbone is the same in
every ingredient, so it runs once per image; each head is then measured in NumPy on the
features, exactly the maths the composed model's Dense layers do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import click
import numpy as np

__all__ = ["read_models", "soup"]


def _images(
    folder: Path, labels: Sequence[str], size: tuple[int, int], task: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """``folder``'s images as backbone inputs and label indexes; ConfigError when unusable."""
    from agent.preprocess import decode_image, prepare_input
    from protocol.errors import ConfigError, FedgeError
    from protocol.preprocess import PreprocessSpec

    if task is not None:
        from coordinator.tasks import load_task

        spec = load_task(task).spec.preprocess
    else:
        spec = PreprocessSpec(height=size[0], width=size[1])
    if not folder.is_dir():
        raise ConfigError(f"--eval {folder}: not a folder of <label>/<image>")
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in labels)
    if unknown:
        raise ConfigError(
            f"--eval {folder}: folders {', '.join(unknown)} are not labels of the models "
            f"({', '.join(labels)})"
        )
    x, y = [], []
    for index, label in enumerate(labels):
        for path in sorted((folder / label).glob("*")) if (folder / label).is_dir() else []:
            try:
                x.append(prepare_input(decode_image(path.read_bytes()), spec))
            except (OSError, FedgeError) as exc:
                raise ConfigError(f"--eval {path}: {exc}") from exc
            y.append(index)
    if not x:
        raise ConfigError(f"--eval {folder}: no images under <label>/ folders")
    return np.stack(x), np.asarray(y, np.int64)


def read_models(paths: Sequence[Path]) -> list[bytes]:
    """Each model file's bytes; ConfigError naming the one that cannot be read."""
    from protocol.errors import ConfigError

    contents = []
    for path in paths:
        try:
            contents.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return contents


def _weights(text: str | None) -> list[float] | None:
    from protocol.errors import ConfigError

    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--weights {text}: comma-separated numbers expected") from exc


@click.command("soup")
@click.argument(
    "models",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
)
@click.option(
    "--eval",
    "eval_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Labelled evaluation images: DIR/<label>/<image> (DIR/<task>/<label>/<image> for "
    "a multi-head model).",
)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Where to write the souped .tflite.",
)
@click.option(
    "--max-drop",
    type=click.FloatRange(min=0),
    default=1.0,
    metavar="POINTS",
    show_default=True,
    help="Refuse the soup when a task's accuracy falls more than this many points below "
    "its best ingredient's.",
)
@click.option("--greedy", is_flag=True, help="Greedy soup: keep an ingredient only if it helps.")
@click.option(
    "--weights",
    default=None,
    metavar="W1,W2,...",
    help="Weights of a weighted soup, e.g. 3,1 (uniform).",
)
@click.option(
    "--task",
    "task_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The task file whose [preprocess] prepares the images (default: RGB scaled to 0..1 "
    "at the backbone's input size).",
)
def soup(
    models: tuple[Path, ...],
    *,
    eval_dir: Path,
    out_path: Path,
    max_drop: float,
    greedy: bool,
    weights: str | None,
    task_path: Path | None,
) -> None:
    """Average serving models of one task, trained apart, into one model (a model soup).

    Each MODEL is a float32 serving model of a transfer release over the same backbone and
    the same labels: the same task trained by two fleets, or before and after. Their heads
    are averaged weight by weight (uniformly, by --weights, or greedily) over the shared
    backbone. The soup is refused, and nothing written, when any task's accuracy on the
    --eval images falls more than --max-drop points below its best ingredient's.

    \b
    Examples:
      fedge model soup site-a.tflite site-b.tflite --eval test/ --out soup.tflite
      fedge model soup r10.tflite r20.tflite --eval test/ --greedy --out door.tflite
      fedge model soup a.tflite b.tflite --weights 3,1 --max-drop 0.5 --eval test/ --out s.tflite
    """
    from agent.head import HeadTrainer
    from agent.transfer_task import Backbone
    from protocol.errors import ConfigError
    from runtime.composition import Head
    from runtime.merging import read_composed
    from runtime.soups import make_soup

    contents = read_models(models)
    names = [str(p) for p in models]
    first = read_composed(contents[0])
    backbone = Backbone(first.backbone)
    height, width = backbone.input_shape[:2]
    several = len(first.heads) > 1
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for head in first.heads:
        folder = eval_dir / head.name if several else eval_dir
        x, y = _images(folder, head.labels, (height, width), task_path)
        data[head.name] = backbone.embed(x), y

    def evaluate(name: str) -> Callable[[Head], float]:
        features, labels = data[name]

        def accuracy(head: Head) -> float:
            predicted = HeadTrainer(list(head.weights)).predict(features).argmax(axis=1)
            return float(np.mean(predicted == labels))

        return accuracy

    result = make_soup(
        contents,
        evaluate,
        names=names,
        weights=_weights(weights),
        greedy=greedy,
        max_drop=max_drop,
    )
    try:
        out_path.write_bytes(result.model)
    except OSError as exc:
        raise ConfigError(f"cannot write {out_path}: {exc.strerror}") from exc
    kind = "greedy" if greedy else ("weighted" if weights else "uniform")
    click.echo(f"{out_path}: {len(result.model)} bytes, a {kind} soup of {len(models)} models")
    for report in result.heads:
        ingredients = ", ".join(
            f"{names[i]} {100 * a:.1f}%" for i, a in enumerate(report.ingredient_accuracy)
        )
        click.echo(
            f"  {report.name}: soup {100 * report.accuracy:.1f}% on {len(data[report.name][1])} "
            f"images ({ingredients}; {len(report.used)} in the soup)"
        )
