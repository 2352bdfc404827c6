"""DP-FedAvg under secure aggregation through a real Mosquitto, agents as processes.

The agents clip, quantise and add their share of the noise before masking; the coordinator
only ever unmasks the noisy sum. The noise in that sum is measured against what the agents
kept of their own clipped updates (``<round>.plain``, which never leaves a device), and the
epsilon against an independent ``dp_accounting`` computation.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from coordinator.dp import DpOptions
from coordinator.rounds import RoundPlan
from fedge.harness.faults import TcpProxy
from fedge.harness.federation import federation
from protocol.messages.codec import decode_message
from protocol.messages.rounds import ModelRelease, UpdateComplete
from protocol.messages.secagg import SecAggParams
from protocol.topics import Topics
from protocol.updates import decode_update, decode_weights, delta_norm
from tests.brokers import MessageCollector, MosquittoProcess, disconnect, mqtt_client, subscribe

pytestmark = [pytest.mark.broker, pytest.mark.system]

AGENTS = 6
VICTIM = "agent-03"
NOISE = 1.0
CLIP_NORM = 0.3
DELTA = 1e-5
PARAMS = SecAggParams(
    threshold=3, degree=5, clip_range=0.5, quantisation_levels=2**20, stage_deadline_s=4.0
)


def independent_epsilon(rounds: int, length: int) -> float:
    """Epsilon by hand: the agents' noise in grid steps against the rounded sensitivity."""
    step = 2 * PARAMS.clip_range / PARAMS.quantisation_levels
    per_agent_steps = NOISE * CLIP_NORM / math.sqrt(PARAMS.threshold) / step
    sensitivity_steps = CLIP_NORM / step + math.sqrt(length) / 2
    multiplier = per_agent_steps * math.sqrt(PARAMS.threshold) / sensitivity_steps
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(multiplier), rounds)
    return float(accountant.get_epsilon(DELTA))


def release_weights(coordinator: Any, version: str) -> list[np.ndarray]:
    release = ModelRelease.model_validate_json(coordinator.state.release_json(version))
    return decode_weights(coordinator.state.blob(release.weights.sha256))


def test_agents_noise_the_sum_before_masking_and_epsilon_is_exact(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        proxy = stack.enter_context(TcpProxy(mosquitto.host, mosquitto.port))
        collector = MessageCollector()
        watcher = mqtt_client(mosquitto, collector=collector)
        stack.callback(disconnect, watcher)
        subscribe(watcher, topics.all_update_manifests())
        fed = stack.enter_context(
            federation(
                tmp_path,
                mosquitto,
                topics,
                num_agents=AGENTS,
                trainer="litert",
                per_agent={VICTIM: {"broker_url": proxy.url}},
            )
        )
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(AGENTS)
        original = coordinator.runner._on_progress

        def on_progress(progress: dict[str, Any]) -> None:
            if progress.get("stage") == "upload":
                proxy.hold_upstream()  # the victim shared its keys, then drops for good
            if original is not None:
                original(progress)

        coordinator.runner._on_progress = on_progress
        length = sum(w.size for w in release_weights(coordinator, "r0"))
        one_round = independent_epsilon(1, length)
        outcomes = coordinator.run_plan_now(
            RoundPlan(
                rounds=4,
                min_agents=AGENTS,
                deadline_s=30.0,
                secure_aggregation=PARAMS,
                privacy=DpOptions(
                    noise_multiplier=NOISE,
                    clip_norm=CLIP_NORM,
                    delta=DELTA,
                    target_epsilon=independent_epsilon(2, length) * 1.000001,
                ),
            )
        )
        assert [o.ok for o in outcomes] == [True, True, False], [o.reason for o in outcomes]
        assert outcomes[-1].privacy_stop
        first, second = outcomes[0].metrics, outcomes[1].metrics
        assert first["secagg_updates"] == AGENTS - 1  # the victim dropped at the upload
        assert second["secagg_updates"] == AGENTS - 1  # and at the keys of round 2
        assert abs(first["dp_epsilon"] - one_round) <= 1e-9
        assert abs(second["dp_epsilon"] - independent_epsilon(2, length)) <= 1e-9
        release = ModelRelease.model_validate_json(coordinator.state.release_json("r2") or "")
        assert release.privacy is not None
        assert abs(release.privacy.epsilon - independent_epsilon(2, length)) <= 1e-9
        assert "distributed discrete Gaussian" in release.privacy.accounting

        # Round 1's noise: the unmasked sum minus what the survivors really sent.
        base, new = release_weights(coordinator, "r0"), release_weights(coordinator, "r1")
        mean = np.concatenate(
            [np.ravel(n.astype(np.float64) - b) for n, b in zip(new, base, strict=True)]
        )
        plain = {}
        for agent in fed.agents:
            path = agent.data_dir / "federated" / "updates" / "1.plain"
            if agent.agent_id != VICTIM:
                plain[agent.agent_id] = decode_update(path.read_bytes())
        for tensors in plain.values():
            assert delta_norm(tensors) <= CLIP_NORM  # clipped on the device, before noise
        survivors = len(plain)
        total = sum(
            np.concatenate([np.ravel(t) for t in tensors]).astype(np.float64)
            for tensors in plain.values()
        )
        noise = mean * survivors - total
        per_agent = NOISE * CLIP_NORM / math.sqrt(PARAMS.threshold)
        expected = per_agent * math.sqrt(survivors)
        assert expected >= NOISE * CLIP_NORM  # the threshold guarantees at least zC
        # 8,714 coordinates estimate a std within about 0.8% (1 sigma): allow 5%.
        assert abs(float(np.std(noise)) / expected - 1.0) < 0.05
        assert abs(float(np.mean(noise))) < 5 * expected / math.sqrt(noise.size)
        for stored in coordinator.state.updates(1):
            assert stored.encoding == "masked_u32"
        # Whether an agent had to clip is a bit about its update alone: it is not sent.
        completes = [decode_message(m.payload, UpdateComplete) for m in collector.messages]
        assert len({(c.round, c.agent) for c in completes}) == 2 * (AGENTS - 1)
        assert all(c.clipped is None for c in completes)
        for agent in fed.agents:
            assert "Traceback" not in agent.log()
