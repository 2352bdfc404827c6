"""Federated aggregation strategies: pure NumPy, streaming where the algorithm allows.

A strategy turns one round's updates into the next global weights::

    aggregation = strategy.begin(global_weights)
    for update in updates:              # any order, each agent at most once
        aggregation.add(update)
    next_global = aggregation.result()

Weights are lists of float arrays in the model's fixed order (Keras ``get_weights()``); an
update carries an agent's locally trained weights (not a delta) and its ``num_examples``.
Strategies do no I/O, read no clock and draw no random numbers. ``begin`` keeps references
to the global arrays, not copies: the caller must not change them until ``result()``.

Strategies::

    FedAvg            mean weighted by num_examples
    FedProx           FedAvg; its ``mu`` reaches the agents through the round config
    FedAdam, FedYogi  FedAvg's mean, then a server optimiser step on the pseudo-gradient
                      (mean - global), Algorithm 2 of Reddi et al., "Adaptive Federated
                      Optimization" (ICLR 2021)
    TrimmedMean       coordinate-wise mean after dropping the ``beta`` fraction at each end
    CoordinateMedian  coordinate-wise median
    NormClipping      wraps any of these; clips each update's delta to an L2 norm first

Memory: FedAvg, FedProx, FedAdam and FedYogi (clipped or not) keep one float64 running sum
per tensor and no update: O(model), whatever the number of agents. TrimmedMean and
CoordinateMedian need every update at once: they keep a reference to each update's arrays,
O(agents x model), plus one stacked tensor at a time while ``result()`` runs. Both ignore
``num_examples``: a count the agent reports itself would let one liar outweigh the rest.

State across rounds: only FedAdam and FedYogi have any (their optimiser moments and step
count). It advances when ``result()`` runs, once per aggregation. The caller persists
``state_dict()`` next to the model version it produced and hands it to ``load_state_dict()``
after a restart; a resumed strategy then produces exactly what an uninterrupted one would.

Errors: an update that does not fit the global weights is a
:class:`~protocol.errors.ProtocolError` with the reasons of :mod:`coordinator.validation`,
or ``duplicate_update`` / ``bad_num_examples``. ``result()`` with no update added is a
:class:`~protocol.errors.ConfigError` with reason ``no_updates``: a round only aggregates
after reaching its quorum, so an empty aggregation means a quorum of zero was configured.
Bad strategy names, options and state are ``ConfigError`` too.
"""

from coordinator.strategies.base import (
    Aggregation,
    ClientUpdate,
    ConfigValue,
    Strategy,
    StrategyState,
)
from coordinator.strategies.fedavg import FedAvg, FedProx
from coordinator.strategies.registry import make_strategy, strategy_names
from coordinator.strategies.robust import CoordinateMedian, NormClipping, TrimmedMean
from coordinator.strategies.server_optimizers import FedAdam, FedYogi

__all__ = [
    "Aggregation",
    "ClientUpdate",
    "ConfigValue",
    "CoordinateMedian",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "NormClipping",
    "Strategy",
    "StrategyState",
    "TrimmedMean",
    "make_strategy",
    "strategy_names",
]
