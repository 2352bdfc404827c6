"""The agent's pipeline against a bare decode+preprocess+invoke loop, side by side.

    python bench/inference.py [--quick] [--runs N] [--models DIR] [--out PATH]

Two models: the reference digits CNN (8x8x1, PNG frames of held-out digits) and a seeded,
untrained float32 CNN with a 224x224x3 input (JPEG frames of scikit-image's photos at
640x480). For each model and each run:

- bare: ``decode_image`` -> ``prepare_input`` -> ``TfliteModel.predict`` per frame, timed;
- throughput: the agent, a ``fedge agent run`` process of its own (TensorFlow blocked, as on
  a Pi) behind a real Mosquitto, gets every frame from a camera of its own (so
  latest-frame-wins drops none), published as fast as possible; frames/s is frames over the
  time from the first publish to the last result; the agent process's CPU time (user plus
  system, all threads) per frame, beside the bare loop's CPU time per frame;
- latency: one enveloped frame at a time, publish -> result round trip; a bare MQTT round
  trip of the same payload (QoS 1, the same client) and a bare frame are measured right
  after each, so the agent's added latency is ``p50(round trip) - p50(bare frame) -
  p50(broker round trip)``; the results' own ``timings`` show the agent's stages.

- with ``--profile DIR``: one more throughput pass with py-spy sampling the agent process
  (``fedge.harness.profile``), its CPU time per frame split by stage (decode, preprocess,
  invoke, outbox, result message, MQTT, ...), measured rather than inferred.
- the agent process's start-up time (spawn to its retained ``online`` status, model loaded)
  and its resident memory (now and peak) after the runs.

Prints medians over the runs with their spread (min-max) and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.model import ServingModel
from fedge.harness.clients import disconnect, mqtt_client, subscribe
from fedge.harness.inference_workloads import (
    MS_PER_S,
    Arrivals,
    Sizes,
    Workload,
    bare_frame,
    bare_loop,
    bare_serving,
    percentile,
    summary,
    workloads,
)
from fedge.harness.measured import MeasuredAgent
from fedge.harness.profile import sampled, split_samples
from protocol.frames import FrameMeta, encode_envelope
from protocol.topics import Topics
from runtime.mosquitto import MosquittoProcess, find_mosquitto

__all__ = ["main"]

_log = logging.getLogger(__name__)

AGENT_ID = "bench-1"
WARMUP_FRAMES = 5
DEFAULT_OUT = Path("bench/results/inference.json")


# --- through the broker ------------------------------------------------------------------


@dataclass(slots=True)
class Link:
    client: mqtt.Client
    agent: MeasuredAgent
    arrivals: Arrivals
    topics: Topics
    echo_topic: str


def _envelope(image: bytes, frame_id: str) -> bytes:
    return encode_envelope(image, FrameMeta(frame_id=frame_id))


def _throughput(link: Link, workload: Workload, run: int) -> dict[str, Any]:
    count = workload.sizes.throughput_frames
    ids = [f"t{run}-{i}" for i in range(count)]
    # Payloads are built before the clock starts: only the publishing counts.
    payloads = [
        (link.topics.camera_frames(f"t{run}-cam{i}"), _envelope(workload.frame(i), ids[i]))
        for i in range(count)
    ]
    cpu_before = link.agent.cpu_s()
    started = time.perf_counter()
    for topic, payload in payloads:
        link.client.publish(topic, payload, qos=1)
    link.arrivals.wait(
        lambda: all(frame_id in link.arrivals.results for frame_id in ids),
        f"{count} throughput results",
    )
    cpu_ms_per_frame = (link.agent.cpu_s() - cpu_before) * MS_PER_S / count
    finished = max(link.arrivals.results[frame_id][0] for frame_id in ids)
    return {"fps": count / (finished - started), "cpu_ms_per_frame": cpu_ms_per_frame}


def _latency(link: Link, serving: ServingModel, workload: Workload, run: int) -> dict[str, Any]:
    round_trips, echoes, bare = [], [], []
    timings: dict[str, list[float]] = {"decode": [], "preprocess": [], "invoke": [], "total": []}
    camera = link.topics.camera_frames(f"l{run}-cam")
    for i in range(workload.sizes.latency_frames):
        frame_id = f"l{run}-{i}"
        payload = _envelope(workload.frame(i), frame_id)
        started = time.perf_counter()
        link.client.publish(camera, payload, qos=1)
        link.arrivals.wait(link.arrivals.has_result(frame_id), frame_id)
        arrived, result = link.arrivals.results[frame_id]
        round_trips.append((arrived - started) * MS_PER_S)
        timings["decode"].append(result.timings.decode_ms)
        timings["preprocess"].append(result.timings.preprocess_ms)
        timings["invoke"].append(result.timings.invoke_ms)
        timings["total"].append(result.timings.total_ms)
        # The same payload through the broker and straight back: what MQTT alone costs.
        seen = link.arrivals.echoes
        started = time.perf_counter()
        link.client.publish(link.echo_topic, payload, qos=1)
        link.arrivals.wait(link.arrivals.has_echoes(seen + 1), "echo")
        echoes.append((link.arrivals.last_echo_at - started) * MS_PER_S)
        # The bare frame right alongside: a change in the machine's load hits both alike.
        bare.append(sum(bare_frame(serving, workload.frame(i))))
    return {
        "round_trip_p50_ms": percentile(round_trips, 50),
        "round_trip_p99_ms": percentile(round_trips, 99),
        "broker_round_trip_p50_ms": percentile(echoes, 50),
        "broker_round_trip_p99_ms": percentile(echoes, 99),
        "bare_p50_ms": percentile(bare, 50),
        **{f"agent_{name}_p50_ms": percentile(values, 50) for name, values in timings.items()},
    }


@contextmanager
def _agent_behind_broker(
    workload: Workload, workdir: Path, *, reliable_results: bool
) -> Iterator[Link]:
    binary = find_mosquitto()
    if binary is None:
        raise RuntimeError("mosquitto is not installed (apt install mosquitto)")
    broker = MosquittoProcess(binary, workdir / "broker")
    broker.start()
    try:
        topics = Topics(fleet="bench")
        settings = {
            "broker_url": broker.url,
            "agent_id": AGENT_ID,
            "fleet": topics.fleet,
            "topic_root": topics.root,
            "data_dir": workdir / "agent",
            "status_interval_s": 3600.0,
            "model_path": workload.model,
            "labels_path": workload.labels,
            "preprocess_path": workload.preprocess,
            "model_version": f"{workload.name}-bench",
            "reliable_results": reliable_results,
        }
        # Another root, so the agent never sees the echoes.
        echo_topic = Topics(root="bench-echo", fleet="bench").camera_frames("echo")
        arrivals = Arrivals(topics.agent_results(AGENT_ID), echo_topic)
        client = mqtt_client(broker)
        client.on_message = arrivals.on_message
        try:
            subscribe(client, topics.agent_results(AGENT_ID), qos=1)
            subscribe(client, echo_topic, qos=1)
            with MeasuredAgent(broker, topics, settings, workdir / "agent") as agent:
                link = Link(client, agent, arrivals, topics, echo_topic)
                _warm_up(link, workload)
                yield link
        finally:
            disconnect(client)
    finally:
        broker.stop()


def _warm_up(link: Link, workload: Workload) -> None:
    camera = link.topics.camera_frames("warm-up")
    for i in range(WARMUP_FRAMES):
        frame_id = f"w-{i}"
        link.client.publish(camera, _envelope(workload.frame(i), frame_id), qos=1)
        link.arrivals.wait(link.arrivals.has_result(frame_id), frame_id)


def _profiled(link: Link, workload: Workload, out: Path) -> dict[str, Any]:
    """One more throughput pass with py-spy sampling the agent: its CPU split by stage."""
    with sampled(link.agent.pid, out):
        throughput = _throughput(link, workload, run=10_000)
    samples, shares = split_samples(out)
    cpu = throughput["cpu_ms_per_frame"]
    return {
        "raw": str(out),
        "samples": samples,
        "cpu_ms_per_frame": cpu,
        "fps": throughput["fps"],
        "stages": {
            stage: {"share": share, "ms_per_frame": share * cpu} for stage, share in shares.items()
        },
    }


def _profile_table(name: str, profile: dict[str, Any]) -> str:
    lines = [
        f"{name}: the agent process's CPU per frame by stage (py-spy, {profile['samples']} "
        f"samples, {profile['cpu_ms_per_frame']:.2f} ms CPU/frame at {profile['fps']:.0f} fps)"
    ]
    for stage, value in profile["stages"].items():
        lines.append(
            f"  {stage:<34} {value['ms_per_frame']:7.3f} ms  {100 * value['share']:5.1f} %"
        )
    return "\n".join(lines)


# --- one workload ------------------------------------------------------------------------


def _measure(
    workload: Workload, runs: int, *, reliable_results: bool, profile_dir: Path | None = None
) -> dict[str, Any]:
    per_run: list[dict[str, Any]] = []
    serving = bare_serving(workload)
    with (
        tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp,
        _agent_behind_broker(workload, Path(tmp), reliable_results=reliable_results) as link,
    ):
        for run in range(runs):
            # Alternated, so a change in the machine's load hits both sides alike.
            bare = bare_loop(serving, workload)
            throughput = _throughput(link, workload, run)
            latency = _latency(link, serving, workload, run)
            added = (
                latency["round_trip_p50_ms"]
                - latency["bare_p50_ms"]
                - latency["broker_round_trip_p50_ms"]
            )
            per_run.append(
                {
                    "agent_startup_s": link.agent.startup_s,
                    "agent_memory": link.agent.memory_bytes(),
                    "cpu_beyond_bare_ms_per_frame": (
                        throughput["cpu_ms_per_frame"] - bare["cpu_ms_per_frame"]
                    ),
                    "bare": bare,
                    "agent_throughput": throughput,
                    "agent_latency": latency,
                    "throughput_ratio": throughput["fps"] / bare["fps"],
                    "added_p50_ms": added,
                    "internal_overhead_p50_ms": (
                        latency["agent_total_p50_ms"] - latency["bare_p50_ms"]
                    ),
                }
            )
        profile = None
        if profile_dir is not None:
            profile = _profiled(link, workload, profile_dir / f"{workload.name}.txt")
            print(_profile_table(workload.name, profile), flush=True)
    return {
        "profile": profile,
        "model": str(workload.model),
        "frame_bytes_mean": statistics.mean(len(f) for f in workload.frames),
        "throughput_frames": workload.sizes.throughput_frames,
        "latency_frames": workload.sizes.latency_frames,
        "runs": per_run,
        "summary": _summarize(per_run),
    }


_SUMMARY_FIELDS: dict[str, Callable[[dict[str, Any]], float]] = {
    "bare_fps": lambda r: r["bare"]["fps"],
    "agent_fps": lambda r: r["agent_throughput"]["fps"],
    "throughput_ratio": lambda r: r["throughput_ratio"],
    "bare_p50_ms": lambda r: r["bare"]["p50_ms"],
    "bare_p50_ms_interleaved": lambda r: r["agent_latency"]["bare_p50_ms"],
    "bare_decode_p50_ms": lambda r: r["bare"]["decode_p50_ms"],
    "bare_preprocess_p50_ms": lambda r: r["bare"]["preprocess_p50_ms"],
    "bare_invoke_p50_ms": lambda r: r["bare"]["invoke_p50_ms"],
    "agent_round_trip_p50_ms": lambda r: r["agent_latency"]["round_trip_p50_ms"],
    "agent_round_trip_p99_ms": lambda r: r["agent_latency"]["round_trip_p99_ms"],
    "broker_round_trip_p50_ms": lambda r: r["agent_latency"]["broker_round_trip_p50_ms"],
    "agent_decode_p50_ms": lambda r: r["agent_latency"]["agent_decode_p50_ms"],
    "agent_preprocess_p50_ms": lambda r: r["agent_latency"]["agent_preprocess_p50_ms"],
    "agent_invoke_p50_ms": lambda r: r["agent_latency"]["agent_invoke_p50_ms"],
    "agent_total_p50_ms": lambda r: r["agent_latency"]["agent_total_p50_ms"],
    "internal_overhead_p50_ms": lambda r: r["internal_overhead_p50_ms"],
    "added_p50_ms": lambda r: r["added_p50_ms"],
    "bare_cpu_ms_per_frame": lambda r: r["bare"]["cpu_ms_per_frame"],
    "agent_cpu_ms_per_frame": lambda r: r["agent_throughput"]["cpu_ms_per_frame"],
    "cpu_beyond_bare_ms_per_frame": lambda r: r["cpu_beyond_bare_ms_per_frame"],
    "agent_startup_s": lambda r: r["agent_startup_s"],
    "agent_rss_mb": lambda r: r["agent_memory"]["rss"] / 2**20,
    "agent_peak_rss_mb": lambda r: r["agent_memory"]["peak_rss"] / 2**20,
}


def _summarize(per_run: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {name: summary([get(r) for r in per_run]) for name, get in _SUMMARY_FIELDS.items()}


# --- report ------------------------------------------------------------------------------


def _table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = [f"{'metric':<28}" + "".join(f"{name + ' median (min-max)':>34}" for name in names)]
    for field in _SUMMARY_FIELDS:
        cells = []
        for name in names:
            s = results[name]["summary"][field]
            cells.append(f"{s['median']:>12.2f} ({s['min']:.2f}-{s['max']:.2f})".rjust(34))
        lines.append(f"{field:<28}" + "".join(cells))
    return "\n".join(lines)


def _headlines(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, result in results.items():
        s = result["summary"]
        lines.append(
            f"{name}: agent/bare throughput {s['throughput_ratio']['median']:.2f}x, "
            f"added p50 latency {s['added_p50_ms']['median']:.1f} ms beyond one broker "
            f"round trip ({s['broker_round_trip_p50_ms']['median']:.1f} ms); agent's own "
            f"stages {s['internal_overhead_p50_ms']['median']:+.2f} ms against the bare loop; "
            f"agent CPU {s['cpu_beyond_bare_ms_per_frame']['median']:+.2f} ms/frame beyond "
            f"the bare loop; start-up {s['agent_startup_s']['median']:.1f} s, peak RSS "
            f"{s['agent_peak_rss_mb']['median']:.0f} MB"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--digits-frames", type=int, default=300, help="frames per run, digits")
    parser.add_argument("--cnn-frames", type=int, default=100, help="frames per run, 224 CNN")
    parser.add_argument(
        "--latency-frames", type=int, default=100, help="one-at-a-time frames per run (max)"
    )
    parser.add_argument("--models", type=Path, help="model directory (default: a cache)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument(
        "--no-reliable-results",
        dest="reliable_results",
        action="store_false",
        help="agent publishes results without its on-disk outbox",
    )
    parser.add_argument("--quick", action="store_true", help="a small version, for a smoke test")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the runs, sample the agent with py-spy through one more throughput pass "
        "and print its CPU per frame by stage (raw stacks written to DIR)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.runs, args.digits_frames, args.cnn_frames, args.latency_frames = 2, 60, 20, 20

    digits = Sizes(args.digits_frames, min(args.latency_frames, args.digits_frames))
    cnn = Sizes(args.cnn_frames, min(args.latency_frames // 2 or 1, args.cnn_frames))
    chosen = workloads(args.models, digits, cnn)
    results: dict[str, dict[str, Any]] = {}
    for workload in chosen:
        print(f"measuring {workload.name} ({args.runs} runs) ...", flush=True)
        results[workload.name] = _measure(
            workload, args.runs, reliable_results=args.reliable_results, profile_dir=args.profile
        )

    print()
    print(_table(results))
    print()
    for line in _headlines(results):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_count": os.cpu_count(),
        "runs": args.runs,
        "reliable_results": args.reliable_results,
        "workloads": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
