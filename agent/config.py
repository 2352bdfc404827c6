"""Agent settings: defaults, then a TOML file, then ``FEDGE_*`` environment variables.

Every option has a default that works on a fresh Pi next to a broker on localhost.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from protocol.chunks import CHUNK_HEADER_BYTES, DEFAULT_MAX_CHUNK_BYTES
from protocol.errors import TopicError
from protocol.frames import DEFAULT_MAX_FRAME_BYTES
from protocol.topics import validate_filter, validate_id
from runtime.settings import FedgeSettings, load_settings

__all__ = ["AgentConfig", "load_agent_config"]


def _default_agent_id() -> str:
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())
    return (name or "agent")[:64]


class AgentConfig(FedgeSettings):
    """Everything an agent can be told. Field names double as TOML keys and env names."""

    # identity and topics
    agent_id: Annotated[str, Field(default_factory=_default_agent_id)]
    frame_topics: tuple[str, ...] = ()  # empty: the fleet's camera topics
    # model and inference
    model_path: Path | None = None
    labels_path: Path | None = None
    preprocess_path: Path | None = None
    model_version: str = "local"
    # load_model commands read only regular files under these directories (resolved,
    # symlinks included) and no larger than max_model_bytes. Empty: <data_dir>/models and
    # the directory of model_path.
    models_dirs: tuple[Path, ...] = ()
    max_model_bytes: Annotated[int, Field(ge=1024)] = 512 * 1024 * 1024
    runtime: Literal["auto", "litert", "tflite_runtime", "tensorflow"] = "auto"
    num_threads: Annotated[int, Field(ge=1, le=64)] = 1
    max_fps: Annotated[float, Field(gt=0.0, le=1000.0)] | None = None
    top_k: Annotated[int, Field(ge=1, le=100)] = 3
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    # frames and cleaning
    max_frame_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_FRAME_BYTES
    reject_duplicates: bool = False
    duplicate_window_s: Annotated[float, Field(ge=0.0)] = 2.0
    recent_frames: Annotated[int, Field(ge=1, le=10_000)] = 64
    # storage
    data_dir: Path = Path("fedge-data")
    outbox_max_rows: Annotated[int, Field(ge=10)] = 10_000
    reliable_results: bool = True
    store_max_per_class: Annotated[int, Field(ge=1)] = 500
    status_interval_s: Annotated[float, Field(gt=0.0)] = 30.0
    # federated learning: without the coordinator's public key the agent takes no part
    coordinator_key: Path | None = None
    trainer: Literal["auto", "litert", "keras"] = "auto"
    follow_fleet_models: bool = True
    # The largest update chunk this agent publishes (header included): fits the broker's
    # message limit (AWS IoT Core 128 KB); smaller chunks resume a cut upload with less resent.
    max_chunk_bytes: Annotated[int, Field(ge=CHUNK_HEADER_BYTES + 1)] = DEFAULT_MAX_CHUNK_BYTES
    # Which of a release's serving variants to serve: "smallest_within" (the smallest within
    # variant_within_points accuracy points of the best), "fastest_within", or a name.
    variant: Annotated[str, Field(min_length=1, max_length=64)] = "smallest_within"
    variant_within_points: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    # Personalisation (transfer tasks, FedPer-style; off unless set): after each release, fine
    # tune the head this many epochs on our own samples and serve that; status compares it
    # with the release's head on the held-out share below.
    personalise_epochs: Annotated[int, Field(ge=1, le=1000)] | None = None
    personalise_learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 0.1
    personalise_eval_fraction: Annotated[float, Field(gt=0.0, le=0.5)] = 0.2
    # local differential privacy: noise added to every update before it leaves the agent
    local_dp_noise_multiplier: Annotated[float, Field(gt=0.0, le=1000.0)] | None = None
    local_dp_clip_norm: Annotated[float, Field(gt=0.0)] | None = None
    local_dp_delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    # observability
    home_assistant_discovery: bool = False
    home_assistant_prefix: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
    ] = "homeassistant"

    @field_validator("agent_id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        try:
            return validate_id(value, what="agent id")
        except TopicError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("frame_topics")
    @classmethod
    def _valid_filters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return tuple(validate_filter(topic_filter) for topic_filter in value)
        except TopicError as exc:
            raise ValueError(str(exc)) from exc

    @property
    def effective_models_dirs(self) -> tuple[Path, ...]:
        if self.models_dirs:
            return self.models_dirs
        dirs = [self.data_dir / "models"]
        if self.model_path is not None:
            dirs.append(self.model_path.parent)
        return tuple(dirs)

    @property
    def effective_frame_topics(self) -> tuple[str, ...]:
        return self.frame_topics or (self.topics.all_camera_frames(),)


def load_agent_config(path: Path | None = None, **overrides: Any) -> AgentConfig:
    """Read the TOML file (if any) and the environment; raise ConfigError naming what is wrong."""
    return load_settings(AgentConfig, path, **overrides)
