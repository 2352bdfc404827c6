"""Loading settings: defaults, then a TOML file, then ``FEDGE_*`` variables, then arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from protocol.errors import ConfigError

__all__ = ["load_settings", "write_toml"]

S = TypeVar("S", bound=BaseSettings)


def load_settings(settings_type: type[S], path: Path | None, **overrides: Any) -> S:
    """Build ``settings_type``; raise ConfigError naming every problem, without a traceback."""
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    chosen: type[S] = settings_type
    if path is not None:
        # A subclass per file: pydantic-settings reads the TOML path from the model config.
        chosen = type(
            settings_type.__name__,
            (settings_type,),
            {"model_config": {**settings_type.model_config, "toml_file": path}},
        )
    try:
        return chosen(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'config'}: {error['msg']}"
            for error in exc.errors(include_input=False)
        )
        raise ConfigError(f"invalid config: {problems}") from exc
    except ValueError as exc:  # TOML syntax errors
        raise ConfigError(f"cannot read config {path}: {exc}") from exc


def write_toml(path: Path, values: dict[str, Any]) -> None:
    """Write a config file; ``None`` values are left out (TOML has no null)."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({k: v for k, v in values.items() if v is not None}))
