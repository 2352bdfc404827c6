"""Coordinator settings: defaults, then a TOML file, then ``FEDGE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from protocol.chunks import CHUNK_HEADER_BYTES, DEFAULT_MAX_CHUNK_BYTES
from runtime.settings import FedgeSettings, load_settings

__all__ = ["CoordinatorConfig", "load_coordinator_config"]


class CoordinatorConfig(FedgeSettings):
    """Everything a coordinator can be told. Field names double as TOML keys and env names."""

    # state and keys
    data_dir: Path = Path("fedge-coordinator")
    signing_key: Path | None = None  # default: <data_dir>/keys/fedge.key, made on first run
    # the model
    model_name: Literal["digits_cnn", "digits_mlp"] = "digits_cnn"
    # A task file (see protocol.tasks); when given it replaces model_name.
    task: Path | None = None
    # Tasks run at once on the fleet, each on its own topics: built-in model names or task
    # files. Started one by one with ``fedge round start --task <name>``.
    tasks: tuple[str, ...] = ()
    # Trainings an agent runs at a time across tasks (the scheduler never gives it more).
    agent_budget: Annotated[int, Field(ge=1, le=64)] = 1
    train_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    with_inference_files: bool = False
    max_chunk_bytes: Annotated[int, Field(ge=CHUNK_HEADER_BYTES + 1)] = DEFAULT_MAX_CHUNK_BYTES
    status_interval_s: Annotated[float, Field(gt=0.0)] = 30.0

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key or self.data_dir / "keys" / "fedge.key"


def load_coordinator_config(path: Path | None = None, **overrides: Any) -> CoordinatorConfig:
    return load_settings(CoordinatorConfig, path, **overrides)
