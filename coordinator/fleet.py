"""The boundary between round logic and the network.

The round logic in :mod:`coordinator.rounds` only talks to a :class:`Fleet`. The MQTT
implementation lives in :mod:`coordinator.mqtt_fleet`; :class:`InMemoryFleet` here lets
tests drive rounds without a broker, with a clock they control.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.errors import ConfigError
from protocol.messages.agent import ErrorEvent
from protocol.messages.base import Message
from protocol.messages.rounds import ModelRelease, RoundAnnouncement, UpdateComplete

__all__ = ["AgentInfo", "Fleet", "InMemoryFleet", "ReceivedUpdate", "SecAggMessage"]


@dataclass(frozen=True, slots=True)
class AgentInfo:
    agent: str
    online: bool
    can_train: bool
    trainers: tuple[str, ...] = ()
    # Samples the agent holds, by label: which tasks it has data for.
    samples_by_label: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ReceivedUpdate:
    """An update whose chunks all arrived and whose hash matched its completion message."""

    complete: UpdateComplete
    payload: bytes
    bytes_received: int


@dataclass(frozen=True, slots=True)
class SecAggMessage:
    """A secure-aggregation stage message; ``agent`` is the one its topic names."""

    round: int
    stage: str
    agent: str
    payload: bytes


class Fleet(ABC):
    """What the round logic needs from the agents, whatever carries the messages."""

    @abstractmethod
    def agents(self) -> dict[str, AgentInfo]:
        """Every agent seen, online or not."""

    @abstractmethod
    def publish_release(self, release: ModelRelease, blobs: dict[str, bytes]) -> int:
        """Make a release and its blobs available; return the bytes published."""

    @abstractmethod
    def announce(self, announcement: RoundAnnouncement) -> None:
        """Publish the (signed, retained) announcement of the current round."""

    @abstractmethod
    def next_update(self, round_number: int, timeout_s: float) -> ReceivedUpdate | None:
        """The next complete update for ``round_number``, or None after ``timeout_s``."""

    @abstractmethod
    def reject(self, event: ErrorEvent, *, agent: str | None = None) -> None:
        """Tell the fleet (and the agent) that something it sent was refused, and why."""

    def next_secagg(self, timeout_s: float) -> SecAggMessage | None:
        """The next secure-aggregation message from an agent, or None after ``timeout_s``."""
        del timeout_s
        raise ConfigError("this fleet cannot run secure aggregation", reason="secagg_fleet")

    def publish_secagg(
        self, round_number: int, stage: str, message: Message, *, agent: str | None = None
    ) -> int:
        """Publish a signed stage message (QoS 1): to everyone, or to ``agent``'s inbox.

        Returns the payload's size in bytes (what each recipient receives).
        """
        del round_number, stage, message, agent
        raise ConfigError("this fleet cannot run secure aggregation", reason="secagg_fleet")

    @abstractmethod
    def now(self) -> float:
        """Seconds since the epoch, on the clock deadlines are measured with."""

    @abstractmethod
    def pause(self, seconds: float) -> None:
        """Let ``seconds`` pass on that clock (waiting for agents to come online)."""


@dataclass
class InMemoryFleet(Fleet):
    """A fleet in a dict, for unit tests of the round logic. Time is a number tests move."""

    known: dict[str, AgentInfo] = field(default_factory=dict)
    clock_s: float = 1_000_000.0
    releases: list[ModelRelease] = field(default_factory=list)
    announcements: list[RoundAnnouncement] = field(default_factory=list)
    rejections: list[tuple[str | None, ErrorEvent]] = field(default_factory=list)
    # Called on every announcement: a test's stand-in for the agents' reaction.
    on_announce: Callable[[RoundAnnouncement], None] | None = None
    _updates: queue.Queue[ReceivedUpdate] = field(default_factory=queue.Queue)

    def agents(self) -> dict[str, AgentInfo]:
        return dict(self.known)

    def publish_release(self, release: ModelRelease, blobs: dict[str, bytes]) -> int:
        self.releases.append(release)
        return sum(len(blob) for blob in blobs.values())

    def announce(self, announcement: RoundAnnouncement) -> None:
        self.announcements.append(announcement)
        if self.on_announce is not None:
            self.on_announce(announcement)

    def deliver(self, update: ReceivedUpdate) -> None:
        self._updates.put(update)

    def next_update(self, round_number: int, timeout_s: float) -> ReceivedUpdate | None:
        del round_number  # every update is handed over; the round logic refuses stale ones
        try:
            return self._updates.get_nowait()
        except queue.Empty:
            # Nothing will come by waiting in memory: let the deadline pass at once.
            self.clock_s += max(timeout_s, 0.0)
            return None

    def reject(self, event: ErrorEvent, *, agent: str | None = None) -> None:
        self.rejections.append((agent, event))

    def now(self) -> float:
        return self.clock_s

    def pause(self, seconds: float) -> None:
        self.clock_s += seconds
