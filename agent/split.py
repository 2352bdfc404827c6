"""The agent's side of split learning: the lower part of a model, trained in LiteRT only.

For each batch of its local data the agent runs ``forward`` of the lower ``.tflite``
(:mod:`coordinator.split_model` builds it), sends the activations and labels up, waits for
the gradient at the cut, runs ``backward`` with it and says ``done``. Every message goes
through the on-disk outbox first, so a reconnect or a restart resends it; the coordinator
answers a resent batch with the gradient it already computed and never applies it twice.

Run as ``python -m agent.split --broker URL --root R --fleet F --agent ID --model lower.tflite
--data batches.npz --round N --out weights.npz`` (``batches.npz`` holds ``x`` and ``y``); with
``--top top.tflite`` the split is U-shaped: the agent also runs the last layers, sends only
activations up and the gradient at the top cut back, and its labels never leave it.
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

__all__ = ["LowerPart", "SplitWorker", "TopPart", "main"]

_log = logging.getLogger(__name__)

GRADIENT_TIMEOUT_S = 10.0
AVERAGE_TIMEOUT_S = 120.0  # the slowest agent of the round has to finish first
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
                for name in ("forward", "backward", "get_weights", "set_weights")
            }
        except ValueError as exc:
            raise ModelError(f"not a split lower part: {exc}", reason="not_split") from exc

    def forward(self, x: FloatArray) -> FloatArray:
        return np.asarray(self._runners["forward"](x=x)["activations"], dtype=np.float32)

    def backward(self, x: FloatArray, grad: FloatArray, learning_rate: float) -> None:
        self._runners["backward"](x=x, grad=grad, lr=np.float32(learning_rate))

    def weights(self) -> dict[str, FloatArray]:
        return {k: np.asarray(v) for k, v in self._runners["get_weights"]().items()}

    def set_weights(self, weights: dict[str, FloatArray]) -> None:
        self._runners["set_weights"](**weights)


class TopPart:
    """A U-shaped split's last layers (``coordinator.split_ushape`` builds them)."""

    def __init__(self, model: bytes) -> None:
        interpreter = load_interpreter_class().interpreter_class(model_content=model)
        try:
            self._runners = {
                name: interpreter.get_signature_runner(name)
                for name in ("train", "get_weights", "set_weights")
            }
        except ValueError as exc:
            raise ModelError(f"not a split top part: {exc}", reason="not_split") from exc

    def train(self, a: FloatArray, y: FloatArray, learning_rate: float) -> tuple[FloatArray, float]:
        """One SGD step of the top weights; (gradient at the top cut, loss)."""
        out = self._runners["train"](a=a, y=y.astype(np.int32), lr=np.float32(learning_rate))
        return np.asarray(out["grad"], dtype=np.float32), float(out["loss"])

    def weights(self) -> dict[str, FloatArray]:
        """``t0``, ``t1``...: named apart from the lower part's ``w0``, ``w1``..."""
        found = self._runners["get_weights"]()
        return {f"t{k[1:]}": np.asarray(v) for k, v in found.items()}

    def set_weights(self, weights: dict[str, FloatArray]) -> None:
        self._runners["set_weights"](**{f"w{k[1:]}": v for k, v in weights.items()})


class SplitWorker:
    """One agent's batches of one round, sent through the outbox, each step waited for."""

    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        agent: str,
        outbox: Outbox,
        lower: LowerPart,
        *,
        top: TopPart | None = None,
    ) -> None:
        self._link, self._topics, self._agent = link, topics, agent
        self._outbox, self._lower, self._top = outbox, lower, top
        self._receiver = SplitReceiver()
        self.gradients: queue.Queue[tuple[BatchId, FloatArray]] = queue.Queue()
        self.middles: queue.Queue[tuple[BatchId, FloatArray]] = queue.Queue()
        self.starts: queue.Queue[tuple[BatchId, dict[str, FloatArray]]] = queue.Queue()
        self.losses: list[float] = []

    def subscriptions(self) -> list[str]:
        """What this worker reads: gradients, and the middle's outputs when it is U-shaped."""
        filters = [
            self._topics.agent_split_downloads(self._agent),
            self._topics.agent_split_starts(self._agent),
        ]
        if self._top is not None:
            filters.append(self._topics.agent_split_middles(self._agent))
        return filters

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = self._topics.parse(topic)
            if parsed.round is None or parsed.step is None or parsed.agent != self._agent:
                return
            batch = BatchId(parsed.round, parsed.agent, parsed.step)
            direction = parsed.direction or ""
            if direction not in {"down", "mid", "start"}:
                return
            if parsed.kind is TopicKind.SPLIT_MANIFEST:
                done = self._receiver.add_manifest(batch, direction, payload)
            elif parsed.kind is TopicKind.SPLIT_CHUNK:
                done = self._receiver.add_chunk(batch, direction, payload)
            else:
                return
        except FedgeError as exc:
            _log.warning("refused split message on %s: %s", topic, exc)
            return
        if done is not None and direction == "down" and "grad" in done[2]:
            self.gradients.put((done[0], done[2]["grad"]))
        elif done is not None and direction == "mid" and "activations" in done[2]:
            self.middles.put((done[0], done[2]["activations"]))
        elif done is not None and direction == "start":
            self.starts.put((done[0], done[2]))

    def _send(self, messages: list[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            row = self._outbox.put(topic, payload, qos=1, retain=False, droppable=False).row_id
            self._link.publish(topic, payload, on_ack=functools.partial(self._outbox.ack, row))

    def run(self, round_number: int, x: FloatArray, y: FloatArray, learning_rate: float) -> None:
        for step in range(len(x)):
            batch = BatchId(round_number, self._agent, step)
            acts = self._lower.forward(x[step])
            if self._top is None:
                up = split_messages(self._topics, batch, "up", {"activations": acts, "y": y[step]})
                grad = self._exchange(batch, up, self.gradients)
            else:  # U-shaped: the labels meet the top part here, on the agent, and stay
                up = split_messages(self._topics, batch, "up", {"activations": acts})
                middle = self._exchange(batch, up, self.middles)
                grad_top, loss = self._top.train(middle, y[step], learning_rate)
                self.losses.append(loss)
                back = split_messages(self._topics, batch, "back", {"grad": grad_top})
                grad = self._exchange(batch, back, self.gradients)
            self._lower.backward(x[step], grad, learning_rate)
            done = self._topics.split_done(batch.round, batch.agent, batch.step)
            self._send([(done, b"")])
            _log.info("split batch %s applied", batch)

    def federate(self, round_number: int, batches: int) -> dict[str, FloatArray]:
        """SplitFed's averaging: send this agent's part, start from the fleet's average.

        Returns the part as it was before averaging.
        """
        own = self.weights()
        batch = BatchId(round_number, self._agent, batches)
        self._send(split_messages(self._topics, batch, "lower", own))
        wanted = BatchId(round_number + 1, self._agent, 0)
        while True:
            try:
                got, averaged = self.starts.get(timeout=AVERAGE_TIMEOUT_S)
            except queue.Empty as exc:
                raise TransportError(f"no averaged part for round {round_number + 1}") from exc
            if got == wanted:
                break
        self._lower.set_weights({k: v for k, v in averaged.items() if k.startswith("w")})
        if self._top is not None:
            self._top.set_weights({k: v for k, v in averaged.items() if k.startswith("t")})
        _log.info("round %d: starting round %d from the averaged part", round_number, got.round)
        return own

    def weights(self) -> dict[str, FloatArray]:
        """The lower part's weights (``w0``...), then the top part's (``t0``...), if any."""
        weights = self._lower.weights()
        if self._top is not None:
            weights |= self._top.weights()
        return weights

    def _exchange(
        self,
        batch: BatchId,
        up: list[tuple[str, bytes]],
        answers: queue.Queue[tuple[BatchId, FloatArray]],
    ) -> FloatArray:
        for _attempt in range(MAX_RESENDS):
            self._send(up)
            try:
                while True:
                    got, tensor = answers.get(timeout=GRADIENT_TIMEOUT_S)
                    if got == batch:
                        return tensor
            except queue.Empty:
                _log.warning("no answer for %s yet: sending the batch again", batch)
        raise TransportError(f"no answer for {batch} after {MAX_RESENDS} tries")


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agent.split", description=__doc__)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--root", default="fedge")
    parser.add_argument("--fleet", default="default")
    parser.add_argument("--agent", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--top", type=Path, help="a U-shaped split's top .tflite (labels stay)")
    parser.add_argument(
        "--federate", action="store_true", help="send the part at the end, start from the average"
    )
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
    top = TopPart(args.top.read_bytes()) if args.top else None
    lower = LowerPart(args.model.read_bytes())
    worker["w"] = SplitWorker(link, topics, args.agent, outbox, lower, top=top)
    for topic_filter in worker["w"].subscriptions():
        link.subscribe(topic_filter)
    link.start()
    try:
        link.wait_connected(CONNECT_TIMEOUT_S)
        worker["w"].run(args.round, x, y, args.lr)
        saved = {"losses": np.asarray(worker["w"].losses, dtype=np.float32)}
        if args.federate:
            own = worker["w"].federate(args.round, len(x))
            saved |= {f"local_{name}": value for name, value in own.items()}
        np.savez(args.out, **saved, **worker["w"].weights())  # type: ignore[arg-type]
    finally:
        link.stop()
        outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
