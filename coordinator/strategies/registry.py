"""Strategies by name, with their options checked: what a round plan or command names."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from coordinator.strategies.base import CLIP_OPTION, ConfigValue, Strategy, number_option
from coordinator.strategies.fedavg import FedAvg, FedProx
from coordinator.strategies.robust import CoordinateMedian, NormClipping, TrimmedMean
from coordinator.strategies.server_optimizers import FedAdam, FedYogi
from protocol.errors import ConfigError

__all__ = ["make_strategy", "strategy_names"]


_REGISTRY: Mapping[str, Callable[..., Strategy]] = {
    FedAvg.name: FedAvg,
    FedProx.name: FedProx,
    FedAdam.name: FedAdam,
    FedYogi.name: FedYogi,
    TrimmedMean.name: TrimmedMean,
    CoordinateMedian.name: CoordinateMedian,
}


def strategy_names() -> tuple[str, ...]:
    """The names :func:`make_strategy` knows."""
    return tuple(_REGISTRY)


def make_strategy(name: str, **options: ConfigValue) -> Strategy:
    """Build a strategy by name; ``clip_norm=<float>`` wraps it in :class:`NormClipping`.

    Option values may be numbers or strings holding numbers (as they arrive from a command
    line or a command message). Raises :class:`ConfigError` naming the valid names or
    options.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown strategy {name!r}; valid names: {', '.join(_REGISTRY)}",
            reason="unknown_strategy",
        )
    accepted = _option_names(factory)
    unknown = sorted(set(options) - accepted - {CLIP_OPTION})
    if unknown:
        valid = ", ".join([*sorted(accepted), CLIP_OPTION])
        raise ConfigError(
            f"strategy {name!r} takes no option(s) {', '.join(unknown)}; valid options: {valid}",
            reason="unknown_option",
        )
    values = {key: number_option(key, value) for key, value in options.items()}
    clip_norm = values.pop(CLIP_OPTION, None)
    strategy = factory(**values)
    if clip_norm is not None:
        strategy = NormClipping(strategy, max_norm=clip_norm)
    return strategy


def _option_names(factory: Callable[..., Strategy]) -> set[str]:
    parameters = inspect.signature(factory).parameters.values()
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
