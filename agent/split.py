"""The agent's side of split learning: the lower part of a model, trained in LiteRT only.

For each batch of its local data the agent runs ``forward`` of the lower ``.tflite``
(:mod:`coordinator.split_model` builds it), sends the activations and labels up, waits for
the gradient at the cut, runs ``backward`` with it and says ``done``. Every message goes
through the on-disk outbox first, so a reconnect or a restart resends it; the coordinator
answers a resent batch with the gradient it already computed and never applies it twice.

Run as ``python -m agent.split --broker URL --root R --fleet F --agent ID --model lower.tflite
--data batches.npz --round N --out weights.npz`` (``batches.npz`` holds ``x`` and ``y``).
This is the recipe's agent step; a task recipe can start it once tasks land.
"""

from __future__ import annotations

import argparse
import functools
import logging
import queue
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.outbox import Outbox
from agent.runtime import load_interpreter_class
from protocol.errors import FedgeError, ModelError, TransportError
from protocol.split import BatchId, SplitReceiver, split_messages
from protocol.topics import TopicKind, Topics
from runtime.address import parse_broker_url
from runtime.mqtt import MqttLink

__all__ = ["LowerPart", "SplitWorker", "main"]

_log = logging.getLogger(__name__)

GRADIENT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
MAX_RESENDS = 3

FloatArray = npt.NDArray[np.float32]


class LowerPart:
    """The lower ``.tflite``'s four signatures, through whichever LiteRT runtime imports."""

    def __init__(self, model: bytes) -> None:
        interpreter = load_interpreter_class().interpreter_class(model_content=model)
        try:
            self._runners = {
                name: interpreter.get_signature_runner(name)
                for name in ("forward", "backward", "get_weights")
            }
        except ValueError as exc:
            raise ModelError(f"not a split lower part: {exc}", reason="not_split") from exc

    def forward(self, x: FloatArray) -> FloatArray:
        return np.asarray(self._runners["forward"](x=x)["activations"], dtype=np.float32)

    def backward(self, x: FloatArray, grad: FloatArray, learning_rate: float) -> None:
        self._runners["backward"](x=x, grad=grad, lr=np.float32(learning_rate))

    def weights(self) -> dict[str, FloatArray]:
        return {k: np.asarray(v) for k, v in self._runners["get_weights"]().items()}


class SplitWorker:
    """One agent's batches of one round, sent through the outbox, each step waited for."""

    def __init__(
        self, link: MqttLink, topics: Topics, agent: str, outbox: Outbox, lower: LowerPart
    ) -> None:
        self._link, self._topics, self._agent = link, topics, agent
        self._outbox, self._lower = outbox, lower
        self._receiver = SplitReceiver()
        self.gradients: queue.Queue[tuple[BatchId, FloatArray]] = queue.Queue()

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = self._topics.parse(topic)
            if parsed.round is None or parsed.step is None or parsed.agent != self._agent:
                return
            batch = BatchId(parsed.round, parsed.agent, parsed.step)
            if parsed.kind is TopicKind.SPLIT_MANIFEST:
                done = self._receiver.add_manifest(batch, "down", payload)
            elif parsed.kind is TopicKind.SPLIT_CHUNK:
                done = self._receiver.add_chunk(batch, "down", payload)
            else:
                return
        except FedgeError as exc:
            _log.warning("refused split message on %s: %s", topic, exc)
            return
        if done is not None and "grad" in done[2]:
            self.gradients.put((done[0], done[2]["grad"]))

    def _send(self, messages: list[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            row = self._outbox.put(topic, payload, qos=1, retain=False, droppable=False).row_id
            self._link.publish(topic, payload, on_ack=functools.partial(self._outbox.ack, row))

    def run(self, round_number: int, x: FloatArray, y: FloatArray, learning_rate: float) -> None:
        for step in range(len(x)):
            batch = BatchId(round_number, self._agent, step)
            acts = self._lower.forward(x[step])
            up = split_messages(self._topics, batch, "up", {"activations": acts, "y": y[step]})
            grad = self._exchange(batch, up)
            self._lower.backward(x[step], grad, learning_rate)
            done = self._topics.split_done(batch.round, batch.agent, batch.step)
            self._send([(done, b"")])
            _log.info("split batch %s applied", batch)

    def weights(self) -> dict[str, FloatArray]:
        return self._lower.weights()

    def _exchange(self, batch: BatchId, up: list[tuple[str, bytes]]) -> FloatArray:
        for _attempt in range(MAX_RESENDS):
            self._send(up)
            try:
                while True:
                    got, grad = self.gradients.get(timeout=GRADIENT_TIMEOUT_S)
                    if got == batch:
                        return grad
            except queue.Empty:
                _log.warning("no gradient for %s yet: sending the batch again", batch)
        raise TransportError(f"no gradient for {batch} after {MAX_RESENDS} tries")


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent.split", description=__doc__)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--root", default="fedge")
    parser.add_argument("--fleet", default="default")
    parser.add_argument("--agent", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--outbox", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    topics = Topics(root=args.root, fleet=args.fleet)
    with np.load(args.data) as data:
        x, y = data["x"].astype(np.float32), data["y"].astype(np.float32)
    outbox = Outbox(args.outbox)
    worker: dict[str, SplitWorker] = {}

    def deliver(topic: str, payload: bytes) -> None:
        worker["w"].on_message(topic, payload)

    link = MqttLink(
        parse_broker_url(args.broker), client_id=f"split-{args.agent}", on_message=deliver
    )
    worker["w"] = SplitWorker(link, topics, args.agent, outbox, LowerPart(args.model.read_bytes()))
    link.subscribe(topics.agent_split_downloads(args.agent))
    link.start()
    try:
        link.wait_connected(CONNECT_TIMEOUT_S)
        worker["w"].run(args.round, x, y, args.lr)
        np.savez(args.out, **worker["w"].weights())  # type: ignore[arg-type]
    finally:
        link.stop()
        outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
