"""``fedge round start --search KEY=V1,V2 --rung-rounds N`` as the coordinator's options."""

from __future__ import annotations

import click

__all__ = ["search_options"]


def search_options(settings: dict[str, object]) -> dict[str, str | int | float | bool]:
    """--search KEY=V1,V2 and --rung-rounds as the coordinator's search.* options."""
    options: dict[str, str | int | float | bool] = {}
    for item in settings.pop("search"):  # type: ignore[attr-defined]
        key, separator, values = str(item).partition("=")
        if not separator or not key or not values:
            raise click.BadParameter(f"{item!r} is not KEY=V1,V2", param_hint="--search")
        options[f"search.{key}"] = values
    rung_rounds = settings.pop("rung_rounds")
    if rung_rounds is not None:
        options["search.rung_rounds"] = int(rung_rounds)  # type: ignore[call-overload]
    return options
