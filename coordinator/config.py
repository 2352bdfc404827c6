"""Coordinator settings: defaults, then a TOML file, then ``FEDGE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fedge.settings import load_settings
from protocol.chunks import CHUNK_HEADER_BYTES, DEFAULT_MAX_CHUNK_BYTES
from protocol.errors import TopicError
from protocol.topics import DEFAULT_FLEET, DEFAULT_ROOT, Topics, validate_id

__all__ = ["CoordinatorConfig", "load_coordinator_config"]


class CoordinatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDGE_", extra="forbid", frozen=True)

    # broker
    broker_url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    fleet: str = DEFAULT_FLEET
    topic_root: str = DEFAULT_ROOT
    # state and keys
    data_dir: Path = Path("fedge-coordinator")
    signing_key: Path | None = None  # default: <data_dir>/keys/fedge.key, made on first run
    # the model
    model_name: Literal["digits_cnn", "digits_mlp"] = "digits_cnn"
    train_batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    with_inference_files: bool = False
    max_chunk_bytes: Annotated[int, Field(ge=CHUNK_HEADER_BYTES + 1)] = DEFAULT_MAX_CHUNK_BYTES
    status_interval_s: Annotated[float, Field(gt=0.0)] = 30.0
    # observability: Prometheus text on http://<host>:<metrics_port>/metrics when set
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None

    @field_validator("fleet")
    @classmethod
    def _valid_fleet(cls, value: str) -> str:
        try:
            return validate_id(value, what="fleet")
        except TopicError as exc:
            raise ValueError(str(exc)) from exc

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        del dotenv_settings, file_secret_settings
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def topics(self) -> Topics:
        return Topics(root=self.topic_root, fleet=self.fleet)

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key or self.data_dir / "keys" / "fedge.key"


def load_coordinator_config(path: Path | None = None, **overrides: Any) -> CoordinatorConfig:
    return load_settings(CoordinatorConfig, path, **overrides)
