from __future__ import annotations

from pathlib import Path

from agent.outbox import Outbox


def test_rows_survive_a_reopen_until_acked(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    first = outbox.put("a/b", b"1")
    second = outbox.put("a/c", b"2", retain=True)
    outbox.ack(first.row_id)
    outbox.close()

    reopened = Outbox(tmp_path / "outbox.db")
    pending = reopened.pending()
    assert [(i.topic, i.payload, i.retain) for i in pending] == [("a/c", b"2", True)]
    assert pending[0].row_id == second.row_id
    reopened.ack(second.row_id)
    assert len(reopened) == 0


def test_bound_drops_oldest_droppable_first_and_counts(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", max_rows=3)
    outbox.put("event", b"e", droppable=False)
    for n in range(4):
        outbox.put("result", str(n).encode(), droppable=True)
    payloads = [item.payload for item in outbox.pending()]
    assert payloads == [b"e", b"2", b"3"]
    assert outbox.dropped == 2


def test_undroppable_rows_are_kept_even_past_the_bound(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", max_rows=1)
    for n in range(3):
        outbox.put("chunk", bytes([n]))
    assert len(outbox) == 3
    assert outbox.dropped == 0
