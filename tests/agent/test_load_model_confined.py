"""``load_model`` through a real Mosquitto: only files inside the models directories.

Before, any client allowed on the command topic could make the agent read any path
(``/dev/zero`` without bound), and a path with a NUL byte was answered ``internal``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from coordinator.tflite_export import ReferenceModels
from protocol.messages.agent import CommandAck
from protocol.topics import Topics
from tests.agent.agent_helpers import RESULT_TIMEOUT_S, agent_settings, decoded, running_agent
from tests.brokers import MessageCollector, MosquittoProcess, disconnect, mqtt_client, publish
from tests.brokers import subscribe as subscribe_to

pytestmark = pytest.mark.broker

MAX_MODEL_BYTES = 1024 * 1024  # the digits models are a few tens of kB


def test_load_model_reads_only_regular_files_inside_the_models_directory(
    mosquitto: MosquittoProcess, topics: Topics, reference_models: ReferenceModels, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(reference_models.digits_int8, models / "digits.tflite")
    shutil.copy(reference_models.labels, models / "labels.txt")
    (models / "escape.tflite").symlink_to(reference_models.digits_float32)
    (models / "zero.tflite").symlink_to("/dev/zero")
    os.mkfifo(models / "pipe.tflite")
    big = models / "big.tflite"
    big.write_bytes(b"\0" * (MAX_MODEL_BYTES + 1))
    outside = tmp_path / "outside.tflite"
    shutil.copy(reference_models.digits_int8, outside)
    cases = {
        "/dev/zero": "outside_models_dir",
        str(outside): "outside_models_dir",
        str(models / ".." / "outside.tflite"): "outside_models_dir",
        "escape.tflite": "outside_models_dir",
        "zero.tflite": "outside_models_dir",
        "pipe.tflite": "not_a_file",
        "big.tflite": "too_large",
        "digits\x00.tflite": "bad_path",
        "missing.tflite": "missing",
    }
    collector = MessageCollector()
    client = mqtt_client(mosquitto, collector=collector)
    events = topics.agent_events("pi-1")
    subscribe_to(client, events)
    settings = agent_settings(
        mosquitto,
        topics,
        tmp_path / "data",
        reference_models,
        models_dirs=(models,),
        max_model_bytes=MAX_MODEL_BYTES,
    )
    try:
        with running_agent(**settings) as agent:
            ids = {}
            for path in cases:
                command_id = f"m-{uuid.uuid4().hex[:8]}"
                ids[command_id] = path
                command = {"kind": "load_model", "command_id": command_id, "path": path}
                publish(client, topics.agent_commands("pi-1"), json.dumps(command).encode())
            good = {
                "kind": "load_model",
                "command_id": "good",
                "path": "digits.tflite",
                "labels_path": "labels.txt",
                "version": "digits-int8",
            }
            publish(client, topics.agent_commands("pi-1"), json.dumps(good).encode())

            def acks(_messages: object) -> dict[str, CommandAck]:
                return {
                    m.command_id: m
                    for m in decoded(collector.on_topic(events))
                    if isinstance(m, CommandAck)
                }

            collector.wait_for(lambda m: "good" in acks(m), RESULT_TIMEOUT_S)
            answered = acks(None)
            # The stranger's paths first: each refused with its reason, none of them read.
            for command_id, path in ids.items():
                ack = answered[command_id]
                assert not ack.ok
                assert ack.reason == cases[path], (path, ack)
            assert answered["good"].ok, answered["good"]
            assert agent.serving is not None
            assert agent.serving.version == "digits-int8"
    finally:
        disconnect(client)
