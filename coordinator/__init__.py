"""The federated-learning coordinator: rounds over the same broker the agents use.

Layer three of four, beside ``agent`` and never importing it: it builds on ``runtime`` and
``protocol``. The public names, by module:

- ``coordinator.daemon``: :class:`Coordinator` (``fedge coordinator run``).
- ``coordinator.config``: :class:`CoordinatorConfig` and :func:`load_coordinator_config`.
- ``coordinator.rounds``: :class:`RoundRunner` and :class:`RoundPlan`, the round state
  machine; ``coordinator.fleet`` the boundary between it and the network.
- ``coordinator.strategies``: :func:`make_strategy`, aggregation by name.
- ``coordinator.state``: :class:`CoordinatorState`, the durable state in SQLite.
- ``coordinator.models`` and ``coordinator.production``: the model definitions and
  :class:`KerasModelProducer`, which makes releases with TensorFlow.
- ``coordinator.reference``: the reference workload (digits, non-IID split, CNN).
- ``coordinator.split`` and ``coordinator.split_model``: split learning's server side
  (:class:`SplitCoordinator`) and the cut model (:class:`UpperPart`, the lower ``.tflite``).

Nothing is imported here: TensorFlow loads only when a model is built.
"""
