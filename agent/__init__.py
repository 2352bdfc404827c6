"""The edge agent: frames in, LiteRT inference and results out, local training for rounds.

Layer three of four, beside ``coordinator`` and never importing it: it builds on
``runtime`` (the MQTT link, blob transfer, settings, metrics) and ``protocol``. The public
names, by module:

- ``agent.daemon``: :class:`Agent`, which wires everything below (``fedge agent run``).
- ``agent.config``: :class:`AgentConfig` and :func:`load_agent_config`.
- ``agent.pipeline``, ``agent.preprocess``, ``agent.postprocess``, ``agent.detection``:
  one frame through decode, preparation, inference and post-processing.
- ``agent.model`` and ``agent.runtime``: :class:`ServingModel` over one LiteRT runtime.
- ``agent.store``: :class:`SampleStore`, the labelled samples a round trains on.
- ``agent.training``: the :class:`Trainer` interface and :func:`make_trainer`.
- ``agent.federated``: :class:`FederatedClient`, the agent's side of a round.
- ``agent.split``: :class:`SplitWorker`, the agent's side of split learning.

Nothing is imported here: OpenCV and LiteRT load only with the modules that need them.
"""
