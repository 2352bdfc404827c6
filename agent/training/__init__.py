"""Local training on the agent: one :class:`Trainer` interface, two backends.

- :class:`LiteRTTrainer` trains a trainable ``.tflite`` (``infer``/``train``/``get_weights``/
  ``set_weights`` signatures, builtin ops only) inside the LiteRT interpreter: no TensorFlow
  needed, which is the point on a small device.
- :class:`KerasTrainer` trains a Keras model where TensorFlow is installed; TensorFlow is
  imported only when one is built, so importing this module never loads it.

Both run the same loop (:meth:`Trainer.train`), so the same data, config and starting
weights give the same SGD steps on either backend:

- the examples are shuffled every epoch with ``np.random.default_rng(config.seed)``, after a
  deterministic validation hold-out drawn from the same generator;
- batches of ``batch_size``, the last one shorter. The trainable ``.tflite`` has a fixed
  batch, so the short batch is zero-padded and masked out: its step is the mean over its
  real examples, as in Keras. Every training example is used, hence ``num_examples`` is the
  number of training examples (validation excluded), the weight FedAvg gives this update;
- FedProx (``proximal_mu > 0``): each step is plain SGD on
  ``loss + (mu / 2) * ||w - w_global||^2``, with ``w_global`` the weights at the start of
  :meth:`Trainer.train`: ``w <- w - lr * grad - lr * mu * (w - w_global)``, both terms at
  the step's starting weights. LiteRT applies the proximal term in NumPy through the weight
  signatures; Keras inside its training step.

Trainers are not thread-safe: use one per thread.
"""

from agent.training.base import (
    DEFAULT_BATCH_SIZE,
    TRAINABLE_SIGNATURES,
    TRAINER_KINDS,
    FloatArray,
    TrainConfig,
    Trainer,
    TrainReport,
    _Step,
)
from agent.training.choice import available_trainers, fitting_trainer, make_trainer
from agent.training.keras_trainer import KerasTrainer, build_keras_model
from agent.training.litert_trainer import LiteRTTrainer

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "TRAINABLE_SIGNATURES",
    "TRAINER_KINDS",
    "FloatArray",
    "KerasTrainer",
    "LiteRTTrainer",
    "TrainConfig",
    "TrainReport",
    "Trainer",
    "_Step",
    "available_trainers",
    "build_keras_model",
    "fitting_trainer",
    "make_trainer",
]
