"""What a demo run is asked to do, and the constants its parts share."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BROKER_USER = "fedge"
BROKER_PASSWORD = "fedge-demo"  # noqa: S105 - a local throwaway broker's password
CAMERA_ID = "demo-cam"
START_TIMEOUT_S = 120.0
LIVE_WINDOW_FRAMES = 40


@dataclass(frozen=True, slots=True)
class DemoSettings:
    agents: int = 4
    rounds: int = 10
    deadline_s: float = 8.0
    fps: float = 4.0
    broker_url: str | None = None
    workdir: Path = Path("fedge-demo")
    drop_agent: bool = True
