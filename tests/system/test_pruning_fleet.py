"""Pruned federated training through a real Mosquitto with LiteRT-only agent processes.

The same digits federation trains twice, dense and pruned to 60% of every kernel on a
schedule; the pruned run's release is at least half zeros, within 1.5 points of the dense
one, smaller compressed, its updates leave pruned weights out, and agents report what they
measured of every variant and which one they serve.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.pruning import PruningSchedule
from fedge.harness.compression import digits_plan, run_digits
from protocol.topics import Topics
from tests.brokers import MosquittoProcess

AGENTS = 3
ROUNDS = 12
EPOCHS = 2
SCHEDULE = PruningSchedule(target=0.6, start_round=2, end_round=7)


def _topics(topics: Topics, name: str) -> Topics:
    return Topics(root=topics.root, fleet=f"{topics.fleet}-{name}")


def test_pruned_training_keeps_accuracy_and_shrinks_the_model_and_the_updates(
    mosquitto: MosquittoProcess, topics: Topics, tmp_path: Path
) -> None:
    dense = run_digits(
        tmp_path / "dense",
        mosquitto,
        _topics(topics, "dense"),
        agents=AGENTS,
        plan=digits_plan(ROUNDS, agents=AGENTS, pruning=None, epochs=EPOCHS),
    )
    pruned = run_digits(
        tmp_path / "pruned",
        mosquitto,
        _topics(topics, "pruned"),
        agents=AGENTS,
        plan=digits_plan(ROUNDS, agents=AGENTS, pruning=SCHEDULE, epochs=EPOCHS),
    )
    assert dense.agent_logs_clean
    assert pruned.agent_logs_clean
    d = {v.name: v for v in dense.release.variants}
    p = {v.name: v for v in pruned.release.variants}
    assert set(d) == {"float32", "int8"}
    assert set(p) == {"float32", "int8", "pruned"}
    assert dense.release.prune_mask is None
    assert pruned.release.prune_mask is not None

    # At least half the weights are zero; accuracy within 1.5 points of dense training.
    assert p["pruned"].sparsity >= 0.5
    assert d["float32"].accuracy is not None
    assert p["pruned"].accuracy is not None
    assert p["pruned"].accuracy >= d["float32"].accuracy - 0.015
    # Smaller compressed, and in sparse storage smaller uncompressed too.
    assert p["pruned"].compressed_bytes < 0.6 * d["float32"].compressed_bytes
    assert p["float32"].compressed_bytes < 0.6 * d["float32"].compressed_bytes
    assert p["pruned"].blob.size_bytes < 0.6 * d["float32"].blob.size_bytes
    assert p["int8"].compressed_bytes < d["int8"].compressed_bytes

    # Pruned entries are not sent: once at the target, an update is the kept values only.
    dense_up = dense.rounds[-1]["bytes_up"] / AGENTS
    pruned_up = pruned.rounds[-1]["bytes_up"] / AGENTS
    assert pruned_up < 0.55 * dense_up

    # Every agent measured every variant, serves one, and says why.
    for run in (dense, pruned):
        rows = {row.variant: row for row in run.card}
        assert sum(row.agents_serving for row in run.card) == AGENTS
        for row in rows.values():
            assert row.agents_measured == AGENTS
            assert row.p50_ms is not None
            assert row.p95_ms is not None
            assert 0.0 < row.p50_ms <= row.p95_ms
            assert row.agents_accuracy is not None
    # The default policy (smallest within 1 point) picks int8 when it is that accurate.
    rows = {row.variant: row for row in pruned.card}
    assert rows["int8"].agents_serving == AGENTS or (
        rows["int8"].agents_accuracy is not None
        and rows["float32"].agents_accuracy is not None
        and rows["int8"].agents_accuracy < rows["float32"].agents_accuracy - 0.01
    )
