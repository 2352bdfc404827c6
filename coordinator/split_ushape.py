"""U-shaped split learning: the agent keeps the first layers and the last ones, so labels stay.

Layers ``[0, cut)`` and ``[top, end)`` run on the agent in LiteRT (the lower ``.tflite`` of
:mod:`coordinator.split_model` and the top one built here), layers ``[cut, top)`` on the
coordinator in Keras (an :class:`~coordinator.split_model.UpperPart` ending at ``top``). Per
batch there are two exchanges instead of one, and the labels never cross the network:

1. ``up``: the agent's activations at the cut;
2. ``mid``: the coordinator's middle output for them;
3. ``back``: the gradient of the loss at the top cut, computed by the agent's top part
   with its own labels (the top part steps its own weights at the same time);
4. ``down``: the gradient at the cut, which the agent's lower part applies; then ``done``.

The middle part is shared and stepped in turn (SplitFed v2, as :mod:`coordinator.split`
says why), so each batch's middle step is staged from its ``up`` to its ``done``: a batch
arriving meanwhile waits, an agent that goes silent has its step thrown away, a resent
frame is answered with what was already computed and applied once.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from coordinator.split import SplitCoordinator, _Reply
from coordinator.split_model import FloatArray, lower_weight_count
from coordinator.trainable import _cross_entropy, _Translator, attach_weight_signatures, import_tf
from coordinator.trainable_export import convert_module
from protocol.split import BatchId, split_messages
from protocol.topics import TopicKind

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

__all__ = ["TOP_SIGNATURES", "UShapedCoordinator", "build_top_module", "export_top_tflite"]

_log = logging.getLogger(__name__)

TOP_SIGNATURES: Final = ("infer", "train", "get_weights", "set_weights")
LABEL_FREE_TENSORS: Final = frozenset({"activations", "grad"})


def build_top_module(model: keras.Model, top: int, *, batch_size: int) -> tf.Module:
    """Layers ``[top, end)`` as a module: ``train(a, y, lr)`` -> loss and gradient at ``top``.

    ``train`` takes one SGD step on the top weights and returns ``{"loss", "grad"}``, the
    gradient of the mean cross-entropy with respect to its input ``a``; ``infer(a)`` gives
    probabilities. Builtin ops only, as :mod:`coordinator.trainable`.
    """
    tf = import_tf()
    if not 0 < top < len(model.layers):
        raise ValueError(f"top cut {top} is not inside the model's {len(model.layers)} layers")
    steps = _Translator(model).run()[top:]
    first = lower_weight_count(model, top)
    initial = [np.asarray(w, dtype=np.float32) for w in model.get_weights()[first:]]
    variables = [tf.Variable(w, name=f"t{i}") for i, w in enumerate(initial)]
    # The translator's steps index weights in the whole model's order.
    indexed: list[Any] = [None] * first + variables
    num_classes = int(model.output_shape[-1])
    shape = [int(d) for d in model.layers[top - 1].output.shape[1:]]
    module = tf.Module(name=f"top_{model.name}")
    module.model_weights = variables

    def logits(a: Any, *, training: bool = False) -> Any:
        for step in steps:
            a = step(tf, indexed, a, training)
        return a

    def infer(a: Any) -> dict[str, Any]:
        return {"output": tf.nn.softmax(logits(a))}

    def train(a: Any, y: Any, lr: Any) -> dict[str, Any]:
        with tf.GradientTape() as tape:
            tape.watch(a)
            mask = tf.ones([batch_size], tf.float32)
            loss = _cross_entropy(tf, logits(a, training=True), y, mask, num_classes)
        grads = tape.gradient(loss, [a, *variables])
        for variable, grad in zip(variables, grads[1:], strict=True):
            variable.assign_sub(lr * grad)
        return {"loss": loss, "grad": grads[0]}

    module.infer = tf.function(
        infer, input_signature=[tf.TensorSpec([None, *shape], tf.float32, name="a")]
    )
    module.train = tf.function(
        train,
        input_signature=[
            tf.TensorSpec([batch_size, *shape], tf.float32, name="a"),
            tf.TensorSpec([batch_size], tf.int32, name="y"),
            tf.TensorSpec([], tf.float32, name="lr"),
        ],
    )
    attach_weight_signatures(tf, module, variables)
    return module


def export_top_tflite(model: keras.Model, top: int, *, batch_size: int) -> bytes:
    """The agent's top part (layers from ``top`` on) as a trainable builtin-only ``.tflite``."""
    module = build_top_module(model, top, batch_size=batch_size)
    return convert_module(module, TOP_SIGNATURES, f"top part of {model.name} from {top}")


class UShapedCoordinator(SplitCoordinator):
    """The middle part over MQTT: ``up`` -> ``mid``, then ``back`` -> ``down``, then ``done``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inputs: dict[BatchId, FloatArray] = {}  # the staged batch's activations
        self._middles: dict[BatchId, list[tuple[str, bytes]]] = {}

    def subscriptions(self) -> list[str]:
        return [*super().subscriptions(), self._topics.all_split_backs()]

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic and topic != "drop":
            parsed = self._topics.parse(topic)
            if parsed.direction == "back" and parsed.agent is not None:
                if parsed.round is None or parsed.step is None:
                    return
                batch = BatchId(parsed.round, parsed.agent, parsed.step)
                self.traffic.up[batch] = self.traffic.up.get(batch, 0) + len(payload)
                self.traffic.uploads.append((topic, payload))
                if parsed.kind is TopicKind.SPLIT_MANIFEST:
                    done = self._receiver.add_manifest(batch, "back", payload)
                else:
                    done = self._receiver.add_chunk(batch, "back", payload)
                if done is not None:
                    self._on_back(batch, done[2])
                return
        super()._handle(topic, payload)

    def _offer(self, batch: BatchId, tensors: dict[str, FloatArray]) -> None:
        if batch in self._middles and self._ledger.staged == batch:
            self._publish(self._middles[batch])  # the activations again: the middle output again
            return
        super()._offer(batch, tensors)

    def _apply(self, batch: BatchId, tensors: dict[str, FloatArray]) -> None:
        acts = tensors.get("activations")
        if acts is None or set(tensors) - LABEL_FREE_TENSORS:
            _log.warning("U-shaped batch %s must carry activations only: %s", batch, set(tensors))
            return
        messages = split_messages(
            self._topics, batch, "mid", {"activations": self.upper.forward(acts)}
        )
        # Staged from now on: no other batch may use the middle part until this one is done.
        self._ledger.stage(batch, _Reply([], [], math.nan))
        self._inputs[batch] = acts
        self._middles = {batch: messages}
        self._deadline = time.monotonic() + self._timeout_s
        self.traffic.down[batch] = sum(len(p) for _t, p in messages)
        self._publish(messages)

    def _on_back(self, batch: BatchId, tensors: dict[str, FloatArray]) -> None:
        grad_out = tensors.get("grad")
        reply = self._ledger.reply_for(batch)
        if reply is None or grad_out is None or set(tensors) - LABEL_FREE_TENSORS:
            return
        if reply.weights:  # computed already: the agent missed the gradient, send it again
            self._publish(reply.messages)
            return
        acts = self._inputs.pop(batch, None)
        if acts is None:
            return
        grad_in, weights = self.upper.step_from(acts, grad_out)
        reply.messages[:] = split_messages(self._topics, batch, "down", {"grad": grad_in})
        reply.weights[:] = weights
        self._deadline = time.monotonic() + self._timeout_s
        self.traffic.down[batch] += sum(len(p) for _t, p in reply.messages)
        self.events.put(("staged", batch))
        if self._on_staged is not None:
            self._on_staged(batch)
        self._publish(reply.messages)

    def _commit(self, batch: BatchId) -> None:
        reply = self._ledger.reply_for(batch)
        if reply is not None and not reply.weights:
            return  # done before its gradient came back: nothing to apply, and no commit
        super()._commit(batch)

    def _abort(self, agent: str) -> None:
        staged = self._ledger.staged
        if staged is not None and staged.agent == agent:
            self._inputs.pop(staged, None)
        super()._abort(agent)
