from __future__ import annotations

from agent.intake import FrameIntake, PendingFrame


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def frame(source: str, n: int) -> PendingFrame:
    return PendingFrame(source=source, topic=f"cams/{source}", payload=bytes([n]), received_at=0.0)


def test_latest_frame_wins_per_source() -> None:
    intake = FrameIntake()
    for n in range(5):
        intake.offer(frame("a", n))
    taken = intake.take(timeout_s=0.0)
    assert taken is not None
    assert taken.payload == bytes([4])
    assert intake.take(timeout_s=0.0) is None
    assert intake.counts.received == 5
    assert intake.counts.dropped_stale == 4


def test_sources_are_served_round_robin() -> None:
    intake = FrameIntake()
    intake.offer(frame("a", 1))
    intake.offer(frame("b", 2))
    intake.offer(frame("a", 3))  # replaces a's pending frame and goes behind b
    first, second = intake.take(0.0), intake.take(0.0)
    assert first is not None
    assert second is not None
    assert [first.source, second.source] == ["b", "a"]
    assert second.payload == bytes([3])


def test_max_fps_drops_frames_that_come_too_soon() -> None:
    clock = FakeClock()
    intake = FrameIntake(max_fps=2.0, monotonic=clock)
    intake.offer(frame("a", 1))
    clock.now += 0.2
    intake.offer(frame("a", 2))
    clock.now += 0.4
    intake.offer(frame("a", 3))
    assert intake.counts.dropped_rate == 1
    assert intake.counts.dropped_stale == 1
    taken = intake.take(0.0)
    assert taken is not None
    assert taken.payload == bytes([3])


def test_close_wakes_a_waiting_taker() -> None:
    intake = FrameIntake()
    intake.close()
    assert intake.take(timeout_s=5.0) is None
