"""Two site Mosquittos bridged to a central one (``fedge deploy mosquitto-bridge``'s config).

Agents connect to their site's broker, the coordinator to the central broker; every byte
between them crosses a real Mosquitto bridge. Site B's bridge runs through a TCP proxy so
the test can cut it mid-round and restore it.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from coordinator.rounds import RoundPlan
from fedge.bridge import Remote, bridge_config
from fedge.harness.federation import federation
from protocol.topics import Topics
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    disconnect,
    find_mosquitto,
    mqtt_client,
    subscribe,
)
from tests.faults import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.system]

SITE_A = ("agent-00", "agent-01")
SITE_B = ("agent-02", "agent-03")
ROUND_TIMEOUT_S = 120.0
QUORUM_DEADLINE_S = 8.0
WAIT_S = 60.0
# Quick reconnects: the test waits for the bridge, not for the production back-off.
RESTART_S = (1, 2)
KEEPALIVE_S = 10


def _bridge_state(site: str) -> str:
    # Mosquitto's own notification topic for a bridge (`notifications true`), retained.
    return f"$SYS/broker/connection/fedge-bridge-{site}/state"


def _site_broker(
    root: Path, site: str, topics: Topics, remote: tuple[str, int]
) -> MosquittoProcess:
    binary = find_mosquitto()
    assert binary is not None, "these tests need a real Mosquitto"
    bridge = bridge_config(
        topics,
        site=site,
        remote=Remote(host=remote[0], port=remote[1]),
        keepalive_s=KEEPALIVE_S,
        restart_s=RESTART_S,
    )
    return MosquittoProcess(binary, root / site, extra_config=bridge.splitlines())


@pytest.fixture
def central(tmp_path: Path) -> Iterator[MosquittoProcess]:
    binary = find_mosquitto()
    assert binary is not None, "these tests need a real Mosquitto"
    broker = MosquittoProcess(binary, tmp_path / "central")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _bridge_is(watcher: MessageCollector, site: str, state: bytes) -> None:
    watcher.wait_for(
        lambda messages: any(
            m.topic == _bridge_state(site) and m.payload == state for m in messages
        ),
        WAIT_S,
    )


def test_bridged_sites_complete_rounds_and_a_cut_site_catches_up(
    central: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        link_b = stack.enter_context(TcpProxy(central.host, central.port))
        site_a = _site_broker(tmp_path, "site-a", topics, (central.host, central.port))
        site_b = _site_broker(tmp_path, "site-b", topics, (link_b.host, link_b.port))
        bridges = MessageCollector()
        central_client = mqtt_client(central, collector=bridges)
        stack.callback(disconnect, central_client)
        subscribe(central_client, "$SYS/broker/connection/+/state")
        subscribe(central_client, topics.round_updates(2))
        for site in (site_a, site_b):
            site.start()
            stack.callback(site.stop)
        _bridge_is(bridges, "site-a", b"1")
        _bridge_is(bridges, "site-b", b"1")
        site_b_updates = MessageCollector()
        site_b_client = mqtt_client(site_b, collector=site_b_updates)
        stack.callback(disconnect, site_b_client)
        subscribe(site_b_client, topics.round_updates(2))

        per_agent = {agent: {"broker_url": site_a.url} for agent in SITE_A}
        per_agent |= {agent: {"broker_url": site_b.url} for agent in SITE_B}
        fed = stack.enter_context(
            federation(tmp_path / "fleet", central, topics, num_agents=4, per_agent=per_agent)
        )
        coordinator = fed.start_coordinator()
        # Agent statuses reach the coordinator only across the bridges.
        fed.wait_for_agents(4)
        everyone = sorted((*SITE_A, *SITE_B))

        (first,) = coordinator.run_plan_now(RoundPlan(min_agents=4, deadline_s=ROUND_TIMEOUT_S))
        assert first.ok, first.reason
        assert [u.agent for u in coordinator.state.updates(1)] == everyone

        # Round 2: site B hears the announcement, trains and uploads to its own broker, but
        # nothing it sends reaches the central broker; then its bridge is cut altogether.
        link_b.hold_upstream()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(
                coordinator.run_plan_now,
                RoundPlan(min_agents=2, deadline_s=QUORUM_DEADLINE_S),
            )
            for agent in SITE_B:
                site_b_updates.wait_for_topic(topics.update_manifest(2, agent), timeout_s=WAIT_S)
            link_b.cut()
            (second,) = future.result(ROUND_TIMEOUT_S)
        assert second.ok, second.reason
        record = coordinator.state.round(2)
        assert record is not None
        assert record.finished_at is not None
        assert record.finished_at >= record.deadline_at  # it waited for site B, then closed
        assert [u.agent for u in coordinator.state.updates(2)] == list(SITE_A)
        assert second.metrics["selected"] == 4
        assert second.metrics["updates"] == 2

        bridges.clear()
        link_b.restore()
        _bridge_is(bridges, "site-b", b"1")
        # Nothing lost: what site B queued during the cut crosses once the bridge is back.
        for agent in SITE_B:
            bridges.wait_for_topic(topics.update_manifest(2, agent), timeout_s=WAIT_S)

        # Site B's agents pick up release r2 from the retained manifest and chunks, and the
        # new announcement, all of which crossed the bridge after the restore.
        (third,) = coordinator.run_plan_now(RoundPlan(min_agents=4, deadline_s=ROUND_TIMEOUT_S))
        assert third.ok, third.reason
        stored = coordinator.state.updates(3)
        assert [u.agent for u in stored] == everyone
        assert third.metrics["examples"] == sum(u.num_examples for u in stored)
        # Nothing counted twice: the late round-2 updates were refused, not added anywhere.
        assert [u.agent for u in coordinator.state.updates(2)] == list(SITE_A)
        # The site broker holds its own retained copy of what came across the bridge.
        late = MessageCollector()
        late_client = mqtt_client(site_b, collector=late)
        stack.callback(disconnect, late_client)
        subscribe(late_client, topics.round_current())
        (announcement,) = late.wait_for_topic(topics.round_current(), timeout_s=WAIT_S)
        assert announcement.retain
        for process in fed.agents:
            assert "Traceback" not in process.log(), process.log()[-3000:]
