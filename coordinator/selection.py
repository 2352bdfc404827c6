"""Which agents a release can be trained by: their trainers against the release's.

An agent's birth message names the trainers it can run (``litert``, ``keras``); a release
names the trainers that can train it (a ``keras`` task whose model LiteRT cannot train names
``keras`` only, with the reason). Agents that fit none are left out of the round, and the
round's status says why.
"""

from __future__ import annotations

from coordinator.fleet import AgentInfo
from protocol.messages.rounds import ModelRelease

__all__ = ["MAX_REASON_CHARS", "trainer_mismatch"]

MAX_REASON_CHARS = 1000


def trainer_mismatch(agent: AgentInfo, release: ModelRelease) -> str | None:
    """Why ``agent`` cannot train ``release``; None when one of its trainers can."""
    # An agent that names no trainers (an in-memory test fleet's) is taken at its word.
    if not agent.trainers or set(agent.trainers) & set(release.trainers):
        return None
    why = (
        f"it trains with {', '.join(agent.trainers)} only; "
        f"this model needs {' or '.join(release.trainers)}"
    )
    if release.litert_refusal is not None and "litert" not in release.trainers:
        why += f" ({release.litert_refusal})"
    return why[:MAX_REASON_CHARS]
