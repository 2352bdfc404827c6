"""The retained-message keeper: what it waits for after a reconnect, and when it republishes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from coordinator.recovery import RetainedKeeper, expected_retained
from protocol.messages.codec import encode_message
from protocol.messages.rounds import (
    BlobRef,
    ModelMetrics,
    ModelRelease,
    RoundAnnouncement,
    RoundConfig,
)
from protocol.preprocess import ColorOrder, PreprocessSpec
from protocol.signing import SigningKey
from protocol.topics import Topics

SHA = "ab" * 32
CHECK_S = 0.2
WAIT_S = 10.0
TOPICS = Topics(root="t-recovery", fleet="test")


def _announcement(round_number: int) -> RoundAnnouncement:
    ref = BlobRef(sha256=SHA, size_bytes=10, chunk_count=1, chunk_bytes=100)
    release = ModelRelease(
        version="r1",
        model_name="digits_cnn",
        round=1,
        weights=ref,
        trainable=ref,
        labels=("0", "1"),
        preprocess=PreprocessSpec(height=8, width=8, color=ColorOrder.GRAY),
        metrics=ModelMetrics(accuracy=0.5, evaluated_on=10),
    )
    return RoundAnnouncement(
        round=round_number,
        release=release,
        selected=("a",),
        config=RoundConfig(),
        deadline_at=100.0,
        issued_at=40.0,
    )


def _signed(announcement: RoundAnnouncement) -> bytes:
    return encode_message(SigningKey.generate().sign(announcement.model_dump_json()))


class _State:
    def get(self, key: str) -> Any:
        return {"current_version": "r1"}.get(key)


class _Runner:
    def __init__(self, announcement: RoundAnnouncement | None) -> None:
        self.announcement = announcement

    def open_announcement(self) -> RoundAnnouncement | None:
        return self.announcement


def _keeper(
    expected: Callable[[], dict[str, Callable[[bytes], bool]]],
) -> tuple[RetainedKeeper, list[str], threading.Event]:
    reasons: list[str] = []
    republished = threading.Event()

    def republish(why: str) -> None:
        reasons.append(why)
        republished.set()

    keeper = RetainedKeeper(
        expected_retained=expected,
        republish=republish,
        resend_blob=lambda _: False,
        check_s=CHECK_S,
    )
    return keeper, reasons, republished


def _open_round_expected(round_number: int) -> Callable[[], dict[str, Callable[[bytes], bool]]]:
    runner = _Runner(_announcement(round_number))
    return lambda: expected_retained(_State(), runner, TOPICS)  # type: ignore[arg-type]


def test_no_session_republishes_at_once() -> None:
    keeper, reasons, republished = _keeper(_open_round_expected(2))
    keeper.on_connected(session_present=False)
    assert republished.wait(WAIT_S)
    keeper.stop()
    assert reasons == ["the broker had no session for the coordinator"]


def test_release_and_open_round_back_on_the_broker_republish_nothing() -> None:
    keeper, reasons, _ = _keeper(_open_round_expected(2))
    started = time.monotonic()
    keeper.on_connected(session_present=True)
    keeper.on_retained(TOPICS.model_manifest("r1"), b"{}")
    keeper.on_retained(TOPICS.round_current(), _signed(_announcement(2)))
    keeper.stop()
    assert reasons == []
    assert keeper.republished == 0
    assert time.monotonic() - started < WAIT_S


def test_a_broker_that_kept_the_release_but_lost_the_open_round_is_told_again() -> None:
    # Its database was saved after round 1's announcement and before round 2's.
    keeper, reasons, republished = _keeper(_open_round_expected(2))
    keeper.on_connected(session_present=True)
    keeper.on_retained(TOPICS.model_manifest("r1"), b"{}")
    keeper.on_retained(TOPICS.round_current(), _signed(_announcement(1)))
    assert republished.wait(WAIT_S)
    keeper.stop()
    assert reasons == [f"retained {TOPICS.round_current()} missing on the broker"]


def test_a_lost_release_manifest_is_told_again() -> None:
    keeper, reasons, republished = _keeper(_open_round_expected(2))
    keeper.on_connected(session_present=True)
    keeper.on_retained(TOPICS.round_current(), _signed(_announcement(2)))
    assert republished.wait(WAIT_S)
    keeper.stop()
    assert reasons == [f"retained {TOPICS.model_manifest('r1')} missing on the broker"]


def test_between_rounds_only_the_release_is_expected() -> None:
    runner = _Runner(None)
    expected = expected_retained(_State(), runner, TOPICS)  # type: ignore[arg-type]
    assert list(expected) == [TOPICS.model_manifest("r1")]


def test_garbage_on_the_announcement_topic_does_not_count_as_the_round() -> None:
    expected = _open_round_expected(2)()
    holds = expected[TOPICS.round_current()]
    assert not holds(b"\x00garbage")
    assert not holds(b"")
    assert holds(_signed(_announcement(2)))
