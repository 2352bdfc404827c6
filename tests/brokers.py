"""Real brokers for the tests, and small paho helpers that wait explicitly.

Both live in the installed package so the benchmarks use them too: the broker processes in
``runtime.launcher`` and ``runtime.mosquitto``, the paho helpers in
``fedge.harness.clients``. This module gathers them under the names the tests use.
"""

from __future__ import annotations

from fedge.harness.clients import (
    CONNECT_TIMEOUT_S,
    MessageCollector,
    Received,
    Will,
    disconnect,
    drop_connection,
    mqtt_client,
    publish,
    subscribe,
)
from runtime.launcher import (
    AMQTT_PASSWORD,
    AMQTT_USERNAME,
    LOOPBACK,
    START_TIMEOUT_S,
    AmqttProcess,
    BrokerEndpoint,
    BrokerProcess,
    BrokerStartError,
    free_port,
    wait_until,
)
from runtime.mosquitto import MosquittoProcess, find_mosquitto, mosquitto_config

__all__ = [
    "AMQTT_PASSWORD",
    "AMQTT_USERNAME",
    "CONNECT_TIMEOUT_S",
    "LOOPBACK",
    "START_TIMEOUT_S",
    "AmqttProcess",
    "BrokerEndpoint",
    "BrokerProcess",
    "BrokerStartError",
    "MessageCollector",
    "MosquittoProcess",
    "Received",
    "Will",
    "disconnect",
    "drop_connection",
    "find_mosquitto",
    "free_port",
    "mosquitto_config",
    "mqtt_client",
    "publish",
    "subscribe",
    "wait_until",
]
