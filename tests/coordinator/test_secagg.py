"""Secure aggregation end to end in memory: agent sessions and the coordinator's unmasker."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from agent.secagg import SecAggClient
from coordinator.secagg import SecAggFailedError, SecAggServer
from protocol.errors import ProtocolError
from protocol.messages.secagg import SecAggParams, UnmaskRequest
from protocol.secagg import error_bound, quantise

LENGTH = 500
PARAMS = SecAggParams(threshold=3, degree=6, clip_range=1.0, quantisation_levels=2**16)
STAGES = ("keys", "shares", "upload", "unmask")


def run_round(
    agents: int, drop: dict[str, set[int]], params: SecAggParams = PARAMS
) -> tuple[np.ndarray, np.ndarray, int]:
    """(unmasked sum, plain sum of the uploaders, uploaders); ``drop`` maps stage -> agents."""
    names = [f"agent-{i:02d}" for i in range(agents)]
    rng = np.random.default_rng(5)
    updates = {name: rng.normal(0.0, 0.3, LENGTH) for name in names}
    clients = {n: SecAggClient(agent=n, round_number=7, params=params) for n in names}
    server = SecAggServer(round_number=7, params=params, selected=tuple(names), length=LENGTH)
    gone: set[str] = set()

    def alive(stage: str) -> list[str]:
        gone.update(names[i] for i in drop.get(stage, set()))
        return [n for n in names if n not in gone]

    for name in alive("keys"):
        assert server.add_keys(clients[name].advertise())
        assert not server.add_keys(clients[name].advertise())  # a QoS 1 duplicate
    directory = server.directory()
    for name in alive("shares"):
        if name in server.keys:
            server.add_shares(clients[name].on_directory(directory))
    inboxes = server.inboxes()
    for name in alive("upload"):
        if name in inboxes:
            clients[name].on_inbox(inboxes[name])
            server.add_masked(name, clients[name].masked(updates[name]))
    request = server.unmask_request()
    for name in alive("unmask"):
        if name in request.survivors:
            server.add_revealed(clients[name].on_unmask(request))
    total, count = server.result()
    plain = sum((np.clip(updates[n], -1, 1) for n in request.survivors), np.zeros(LENGTH))
    return total, plain, count


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("dropping", [0, 1, 3], ids=["none", "one", "30-percent"])
def test_the_unmasked_sum_is_the_plain_sum_within_the_bound(stage: str, dropping: int) -> None:
    agents = 10
    total, plain, count = run_round(agents, {stage: set(range(dropping))})
    expected_count = agents - dropping if stage in {"keys", "shares", "upload"} else agents
    assert count == expected_count
    bound = error_bound(agents=count, clip=1.0, levels=PARAMS.quantisation_levels)
    assert np.max(np.abs(total - plain)) <= bound


def test_drops_at_every_stage_at_once() -> None:
    total, plain, count = run_round(
        12, {"keys": {0}, "shares": {5}, "upload": {6, 9}, "unmask": {2}}
    )
    assert count == 8
    assert np.max(np.abs(total - plain)) <= error_bound(agents=8, clip=1.0, levels=2**16)


def test_below_threshold_fails_with_a_reason_at_each_stage() -> None:
    for stage in ("keys", "shares", "upload"):
        with pytest.raises(SecAggFailedError, match="threshold 3"):
            run_round(6, {stage: {0, 1, 2, 3}})
    with pytest.raises(SecAggFailedError, match="too few agents revealed"):
        run_round(6, {"unmask": {0, 1, 2, 3}})


def shared_round(
    names: list[str], params: SecAggParams, number: int, length: int
) -> tuple[dict[str, SecAggClient], SecAggServer]:
    """Clients and server through key and share exchange, every agent present."""
    clients = {n: SecAggClient(agent=n, round_number=number, params=params) for n in names}
    server = SecAggServer(round_number=number, params=params, selected=tuple(names), length=length)
    for client in clients.values():
        server.add_keys(client.advertise())
    directory = server.directory()
    for client in clients.values():
        server.add_shares(client.on_directory(directory))
    for name, inbox in server.inboxes().items():
        clients[name].on_inbox(inbox)
    return clients, server


def test_a_masked_upload_is_indistinguishable_from_uniform() -> None:
    params = SecAggParams(threshold=2, degree=2, clip_range=1.0, quantisation_levels=2**16)
    names = ["a", "b", "c"]
    clients, _ = shared_round(names, params, 1, 20_000)
    update = np.full(20_000, 0.25)  # as far from uniform as an update gets
    masked = clients["a"].masked(update)
    assert stats.kstest(masked / 2**32, "uniform").pvalue > 1e-3
    counts = np.bincount((masked >> np.uint32(24)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3
    plain = quantise(update, clip=1.0, levels=2**16)
    assert stats.kstest(plain / 2**32, "uniform").pvalue < 1e-100


def test_an_agent_refuses_to_reveal_both_shares_of_one_peer() -> None:
    names = [f"n{i}" for i in range(5)]
    params = SecAggParams(threshold=2, degree=4)
    clients, _ = shared_round(names, params, 2, 4)
    me = clients["n0"]
    with pytest.raises(ProtocolError) as both:
        me.on_unmask(UnmaskRequest(round=2, survivors=("n0", "n1", "n2"), dropped=("n2",)))
    assert both.value.reason == "secagg_both_shares"
    me.on_unmask(UnmaskRequest(round=2, survivors=("n0", "n1", "n2"), dropped=("n3",)))
    # A second request that now calls n3 a survivor would expose its self mask too.
    with pytest.raises(ProtocolError) as again:
        me.on_unmask(UnmaskRequest(round=2, survivors=("n0", "n1", "n3"), dropped=()))
    assert again.value.reason == "secagg_both_shares"
    with pytest.raises(ProtocolError) as few:
        me.on_unmask(UnmaskRequest(round=2, survivors=("n0",), dropped=()))
    assert few.value.reason == "secagg_threshold"


def test_start_options_make_the_plan_and_what_needs_single_updates_is_refused() -> None:
    from coordinator.daemon import plan_from_command
    from protocol.errors import ConfigError
    from protocol.messages.commands import StartRounds

    plan = plan_from_command(
        StartRounds(
            command_id="s1",
            strategy="fedyogi",
            options={"secure_aggregation": True, "secagg_threshold": 3, "secagg_clip_range": 0.5},
        )
    )
    assert plan.secure_aggregation == SecAggParams(threshold=3, degree=6, clip_range=0.5)
    assert plan.strategy_options == {}
    for strategy, options, reason in (
        ("trimmed_mean", {"secure_aggregation": True}, "secagg_strategy"),
        ("fedavg", {"secure_aggregation": True, "max_update_norm": 3.0}, "secagg_validation"),
        ("fedavg", {"secure_aggregation": True, "clip_norm": 3.0}, "secagg_validation"),
        ("fedavg", {"secagg_threshold": 3}, "bad_options"),
        (
            "fedavg",
            {
                "secure_aggregation": True,
                "dp_noise_multiplier": 1.0,
                "dp_clip_norm": 1.0,
                "dp_adaptive": True,
            },
            "secagg_dp_adaptive",
        ),
    ):
        with pytest.raises(ConfigError) as caught:
            plan_from_command(
                StartRounds(command_id="s2", strategy=strategy, options=dict(options))
            )
        assert caught.value.reason == reason, (strategy, options)
