"""A start_rounds command turned into a round plan, whatever the network put in it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from coordinator.distributed_dp import check_distributed_plan
from coordinator.dp import DP_OPTION_PREFIX, DpOptions, check_strategy
from coordinator.pruning import PRUNE_OPTION_PREFIX, PruningSchedule
from coordinator.rounds import RoundPlan
from coordinator.secagg_rounds import check_secure_plan, secagg_from_options
from coordinator.strategies import make_strategy
from protocol.errors import FedgeError
from protocol.messages.commands import StartRounds
from protocol.messages.rounds import RoundConfig, UpdateEncoding

__all__ = ["plan_from_command"]


def _flag(value: object) -> bool:
    # bool("false") is True: a flag from a command line or JSON string must say what it means.
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{value!r} is not a yes/no value")


_CONFIG_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "epochs": int,
    "batch_size": int,
    "learning_rate": float,
    "proximal_mu": float,
    "update_encoding": str,
    "augment": _flag,
    "seed": int,
    "min_samples": int,
    "eval_fraction": float,
}


def plan_from_command(
    command: StartRounds, *, defaults: Mapping[str, Any] | None = None
) -> RoundPlan:
    """Turn a start_rounds command into a plan; options split into round config and strategy.

    ``defaults`` (the task's training defaults) fill the round config where the command is
    silent. Any option that does not fit raises :class:`FedgeError` with reason
    ``bad_options``: the command comes from the network, so a wrong value is an answer,
    never a crash.
    """
    try:
        return _plan(command, defaults)
    except FedgeError:
        raise
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise FedgeError(f"invalid round options: {exc}", reason="bad_options") from exc


def _plan(command: StartRounds, defaults: Mapping[str, Any] | None) -> RoundPlan:
    config_fields: dict[str, Any] = dict(defaults or {})
    strategy_options: dict[str, Any] = {}
    max_update_norm = None
    for key, value in command.options.items():
        if key in _CONFIG_OPTIONS:
            config_fields[key] = _CONFIG_OPTIONS[key](value)
        elif key == "max_update_norm":
            max_update_norm = float(value)
        else:
            strategy_options[key] = value
    if "update_encoding" in config_fields:
        config_fields["update_encoding"] = UpdateEncoding(config_fields["update_encoding"])
    config = RoundConfig.model_validate(config_fields, strict=False)
    secure = secagg_from_options(strategy_options)
    strategy_options = {
        k: v for k, v in strategy_options.items() if not k.startswith(("secagg", "secure_"))
    }
    pruning = PruningSchedule.from_options(strategy_options)
    strategy_options = {
        k: v for k, v in strategy_options.items() if not k.startswith(PRUNE_OPTION_PREFIX)
    }
    privacy = DpOptions.from_options(strategy_options)
    strategy_options = {
        k: v for k, v in strategy_options.items() if not k.startswith(DP_OPTION_PREFIX)
    }
    make_strategy(command.strategy, **strategy_options)  # refuse a bad strategy at once
    if privacy is not None:
        check_strategy(command.strategy, strategy_options)
    if secure is not None:
        check_secure_plan(command.strategy, strategy_options, max_update_norm)
        if privacy is not None:
            check_distributed_plan(privacy, secure)
    return RoundPlan(
        rounds=command.rounds,
        min_agents=command.min_agents,
        fraction=command.fraction,
        deadline_s=command.deadline_s,
        strategy=command.strategy,
        strategy_options=strategy_options,
        config=config,
        max_update_norm=max_update_norm,
        privacy=privacy,
        secure_aggregation=secure,
        pruning=pruning,
    )
