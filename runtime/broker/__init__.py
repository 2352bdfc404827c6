"""fedge's embedded MQTT broker (amqtt): in a thread (:class:`EmbeddedBroker`) or a process.

``python -m runtime.broker`` runs it as a process until SIGTERM or SIGINT.
"""

from runtime.broker.embedded import (
    DEFAULT_BROKER_HOST,
    DEFAULT_BROKER_PASSWORD,
    DEFAULT_BROKER_PORT,
    DEFAULT_BROKER_USERNAME,
    PASSWORD_ENV_VAR,
    EmbeddedBroker,
)
from runtime.broker.process import run_embedded_broker

__all__ = [
    "DEFAULT_BROKER_HOST",
    "DEFAULT_BROKER_PASSWORD",
    "DEFAULT_BROKER_PORT",
    "DEFAULT_BROKER_USERNAME",
    "PASSWORD_ENV_VAR",
    "EmbeddedBroker",
    "run_embedded_broker",
]
