"""A running process sampled with py-spy, and its samples split by what the agent was doing.

``py-spy record --format raw`` writes one line per distinct stack (thread, then frames from
the outermost to the innermost, then how many samples had it), counting only threads that
were running, not waiting. Each stack goes to the stage of its innermost frame that names
one (so an SQLite call inside the outbox counts as the outbox, a JSON encode inside the
result's publishing as encoding); the split is the share of samples per stage, and with the
process's CPU time per frame beside it, the milliseconds each stage costs per frame.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STAGES", "py_spy", "sampled", "split_samples"]

# (stage, substrings of a frame "function (file:line)"), matched innermost frame first.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decode", ("decode_image", "imdecode")),
    ("preprocess", ("prepare_input", "agent/preprocess.py")),
    ("invoke", ("agent/runtime.py", "ai_edge_litert", "TfliteModel", "interpreter")),
    ("postprocess", ("agent/postprocess.py", "agent/detection.py", "agent/head.py")),
    ("outbox (SQLite)", ("agent/outbox.py", "sqlite3")),
    ("result message (pydantic, JSON)", ("encode_message", "pydantic", "json/")),
    ("frame envelope", ("protocol/frames.py", "decode_envelope")),
    ("intake and hand-off", ("agent/intake.py", "queue.py", "threading.py")),
    ("metrics", ("prometheus_client", "agent/metrics.py", "runtime/metrics.py")),
    ("logging", ("logging/",)),
    ("MQTT (paho, sockets)", ("paho/", "runtime/mqtt.py", "socket.py", "ssl.py")),
)


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter or on the PATH."""
    return shutil.which("py-spy")


@contextmanager
def sampled(pid: int, out: Path, *, rate_hz: int = 250) -> Iterator[Path]:
    """Samples ``pid`` while the block runs; the raw stacks end up in ``out``."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    recorder = subprocess.Popen(
        [
            *(binary, "record", "--pid", str(pid), "--rate", str(rate_hz)),
            *("--format", "raw", "--output", str(out), "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield out
    finally:
        # SIGINT makes py-spy write what it sampled and exit.
        recorder.send_signal(2)
        try:
            recorder.wait(30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait()


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, marks in STAGES:
            if any(mark in frame for mark in marks):
                return stage
    return "other"


def split_samples(raw: Path) -> tuple[int, dict[str, float]]:
    """Samples counted and each stage's share of them, largest first."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        counts[stage_of(stack.split(";")[1:])] += int(count)
    total = sum(counts.values())
    shares = {stage: n / total for stage, n in counts.most_common()} if total else {}
    return total, shares
