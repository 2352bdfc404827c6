"""DP-FedAvg through a real Mosquitto: agents as processes clip, the coordinator accounts."""

from __future__ import annotations

from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from coordinator.dp import DpOptions
from coordinator.rounds import RoundPlan
from fedge.harness.federation import federation
from protocol.messages.codec import decode_message
from protocol.messages.rounds import CoordinatorStatus, ModelRelease
from protocol.signing import SignedMessage
from protocol.topics import Topics
from protocol.updates import decode_update, delta_norm
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    subscribe,
)

pytestmark = [pytest.mark.broker, pytest.mark.system]

CLIP_NORM = 0.3
NOISE = 0.8
DELTA = 1e-5


def test_dp_rounds_clip_on_the_agents_and_report_epsilon_everywhere(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(NOISE), 2)
    two_rounds = float(accountant.get_epsilon(DELTA))
    with federation(tmp_path, mosquitto, topics, num_agents=3, trainer="litert") as fed:
        coordinator = fed.start_coordinator()
        fed.wait_for_agents(3)
        outcomes = coordinator.run_plan_now(
            RoundPlan(
                rounds=5,
                min_agents=3,
                deadline_s=60.0,
                privacy=DpOptions(
                    noise_multiplier=NOISE,
                    clip_norm=CLIP_NORM,
                    delta=DELTA,
                    target_epsilon=two_rounds * 1.0001,
                ),
            )
        )
        assert [o.ok for o in outcomes] == [True, True, False], [o.reason for o in outcomes]
        assert outcomes[-1].privacy_stop
        assert abs(outcomes[1].metrics["dp_epsilon"] - two_rounds) <= 1e-9
        # What the agents sent, as the coordinator stored it: clipped to C by the agents.
        for number in (1, 2):
            stored = coordinator.state.updates(number)
            assert len(stored) == 3
            for update in stored:
                assert delta_norm(decode_update(update.payload)) <= CLIP_NORM
        collector = MessageCollector()
        client = mqtt_client(mosquitto, collector=collector)
        try:
            subscribe(client, topics.coordinator_status())
            subscribe(client, topics.model_manifest("r2"))

            def idle_status_and_release(messages: list[Received]) -> bool:
                # The retained status may still be round 2's when we subscribe: the idle
                # one published after the plan ended can be in flight; wait for it.
                statuses = [
                    decode_message(m.payload, CoordinatorStatus)
                    for m in messages
                    if m.topic == topics.coordinator_status()
                ]
                releases = [m for m in messages if m.topic != topics.coordinator_status()]
                return bool(releases) and bool(statuses) and statuses[-1].state == "idle"

            collector.wait_for(idle_status_and_release, 30.0)
        finally:
            disconnect(client)
        statuses = [m for m in collector.messages if m.topic == topics.coordinator_status()]
        for message in [statuses[-1], *collector.on_topic(topics.model_manifest("r2"))]:
            if message.topic == topics.coordinator_status():
                status = decode_message(message.payload, CoordinatorStatus)
                assert status.epsilon is not None
                assert abs(status.epsilon - two_rounds) <= 1e-9
                assert status.delta == DELTA
            else:
                signed = decode_message(message.payload, SignedMessage)
                release = ModelRelease.model_validate_json(signed.body)
                assert release.privacy is not None
                assert abs(release.privacy.epsilon - two_rounds) <= 1e-9
        gauge = coordinator.metrics.get_sample_value("fedge_coordinator_privacy_epsilon")
        assert gauge is not None
        assert abs(gauge - two_rounds) <= 1e-9
        for agent in fed.agents:
            assert "Traceback" not in agent.log()
