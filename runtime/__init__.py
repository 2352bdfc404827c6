"""The runtime that the agent and the coordinator share: everything that talks to the network.

Layer two of four: it imports ``protocol`` and nothing of fedge above it (agent, coordinator,
commands), so both daemons build on it without knowing each other.

- ``runtime.mqtt``: :class:`MqttLink`, the one adapter over paho (persistent session,
  reconnect with backoff and jitter, QoS 1 acknowledgements), and broker URLs.
- ``runtime.transfer``: content-addressed blobs in retained chunks, resumable fetches.
- ``runtime.settings``: the settings every process shares (broker, fleet, metrics port).
- ``runtime.metrics``: a Prometheus registry per process and its HTTP server.
- ``runtime.broker``: the embedded MQTT 3.1.1 broker (``python -m runtime.broker``).
- ``runtime.launcher`` and ``runtime.mosquitto``: broker processes on a free port, for the
  test suite and the benchmarks.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
