import numpy as np
import pytest

from protocol.errors import ProtocolError, TopicError
from protocol.split import (
    BatchId,
    Decision,
    SplitLedger,
    SplitReceiver,
    cut_bytes,
    framing_bytes,
    payload_tensor_names,
    split_messages,
)
from protocol.topics import TopicKind, Topics

TOPICS = Topics(fleet="split-test")


def test_frames_round_trip_in_any_order_with_exact_tensor_bytes() -> None:
    batch = BatchId(3, "pi-1", 7)
    acts = np.random.default_rng(0).normal(size=(16, 256)).astype(np.float32)
    messages = split_messages(TOPICS, batch, "up", {"activations": acts}, max_chunk_bytes=4096)
    assert len(messages) > 2
    total = sum(len(payload) for _topic, payload in messages)
    assert total - framing_bytes(messages) == cut_bytes(16, 256)
    receiver = SplitReceiver()
    results = []
    for topic, payload in reversed(messages):  # chunks before their manifest
        parsed = TOPICS.parse(topic)
        assert (parsed.round, parsed.agent, parsed.step, parsed.direction) == (3, "pi-1", 7, "up")
        add = (
            receiver.add_manifest if parsed.kind is TopicKind.SPLIT_MANIFEST else receiver.add_chunk
        )
        results.append(add(batch, "up", payload))
    done = [r for r in results if r is not None]
    assert len(done) == 1
    np.testing.assert_array_equal(done[0][2]["activations"], acts)
    blob = b"".join(p[49:] for _t, p in messages[1:])
    assert payload_tensor_names(blob) == ["activations"]


def test_split_topics_parse_and_refuse_bad_shapes() -> None:
    done = TOPICS.parse(TOPICS.split_done(1, "a", 2))
    assert (done.kind, done.round, done.agent, done.step) == (TopicKind.SPLIT_DONE, 1, "a", 2)
    with pytest.raises(TopicError):
        TOPICS.split_manifest(1, "a", 2, "sideways")
    with pytest.raises(TopicError):
        TOPICS.parse(TOPICS.all_split_done().replace("+", "x"))


def test_ledger_stages_commits_once_and_aborts_a_dropped_agent() -> None:
    ledger: SplitLedger[str] = SplitLedger()
    first, second = BatchId(1, "a", 0), BatchId(1, "b", 0)
    assert ledger.decide(first) is Decision.APPLY
    ledger.stage(first, "grad-a")
    assert ledger.decide(first) is Decision.RESEND
    assert ledger.reply_for(first) == "grad-a"
    assert ledger.decide(second) is Decision.WAIT
    with pytest.raises(ProtocolError):
        ledger.stage(second, "grad-b")
    assert ledger.commit(first)
    assert not ledger.commit(first)  # a duplicate done applies nothing
    assert ledger.decide(first) is Decision.RESEND  # a duplicate batch is answered, not applied
    assert ledger.reply_for(first) == "grad-a"
    ledger.stage(second, "grad-b")
    assert ledger.abort("a") is None
    assert ledger.abort("b") == second
    assert ledger.decide(second) is Decision.APPLY  # the agent may retry the batch later
    assert (ledger.applied, ledger.aborted) == (1, 1)
