"""Loading settings: defaults, then a TOML file, then ``FEDGE_*`` variables, then arguments."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from protocol.errors import ConfigError, TopicError
from protocol.operator import DEFAULT_COMMAND_WINDOW_S
from protocol.topics import DEFAULT_FLEET, DEFAULT_ROOT, Topics, validate_id

if TYPE_CHECKING:
    from runtime.mqtt import BrokerAddress

__all__ = ["FedgeSettings", "load_settings", "write_toml"]


class FedgeSettings(BaseSettings):
    """What every fedge process is told: its broker, its fleet, where to serve metrics."""

    model_config = SettingsConfigDict(env_prefix="FEDGE_", extra="forbid", frozen=True)

    broker_url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    fleet: str = DEFAULT_FLEET
    topic_root: str = DEFAULT_ROOT
    # observability: Prometheus text on http://<host>:<metrics_port>/metrics when set
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    # Operator-signed commands (protocol.operator), off when empty: with public keys here,
    # every command must carry a fresh signature by one of them, else it is refused.
    operator_keys: tuple[Path, ...] = ()
    operator_command_window_s: Annotated[float, Field(gt=0.0, le=86_400.0)] = (
        DEFAULT_COMMAND_WINDOW_S
    )

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
        # Environment beats the file; explicit arguments (the CLI's) beat both. No .env
        # files and no secrets directory: settings live in one visible place.
        del dotenv_settings, file_secret_settings
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def topics(self) -> Topics:
        return Topics(root=self.topic_root, fleet=self.fleet)

    def broker_address(self) -> BrokerAddress:
        from runtime.mqtt import parse_broker_url

        return parse_broker_url(
            self.broker_url,
            username=self.username,
            password=self.password,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
        )

    def redacted(self) -> dict[str, Any]:
        values = self.model_dump(mode="json")
        if values.get("password"):
            values["password"] = "***"  # noqa: S105 - the mask, not a password
        return values


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
