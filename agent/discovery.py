"""Home Assistant MQTT discovery for one agent: which entities it offers, as retained configs.

Home Assistant reads ``<prefix>/<component>/<node_id>/<object_id>/config`` (retained JSON)
and creates one device per agent with a connectivity sensor, frame counters and the last
result. Every state comes from topics the agent already publishes (its retained status and
its results), so nothing here adds to the wire protocol. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from protocol.errors import TopicError
from protocol.topics import Topics
from runtime import __version__

__all__ = [
    "DEFAULT_PREFIX",
    "DiscoveryConfig",
    "agent_discovery",
    "discovery_topic",
    "ha_id",
]

DEFAULT_PREFIX = "homeassistant"
MANUFACTURER = "fedge"
DEVICE_MODEL = "fedge edge agent"
ONLINE = "online"
OFFLINE = "offline"

_HA_ID = re.compile(r"[a-zA-Z0-9_-]+")
_NOT_HA_ID = re.compile(r"[^a-zA-Z0-9_-]")
_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9_.\-]+")
_STATE = "{{ value_json.state }}"
_TOP = "value_json.predictions[0]"


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """One entity's discovery message; always published retained."""

    topic: str
    config: dict[str, Any]

    @property
    def payload(self) -> bytes:
        return json.dumps(self.config, sort_keys=True, separators=(",", ":")).encode("utf-8")


def ha_id(*parts: str) -> str:
    """Join ``parts`` into an id Home Assistant accepts (``[a-zA-Z0-9_-]+``)."""
    joined = "_".join(_NOT_HA_ID.sub("_", part) for part in parts if part)
    if not _HA_ID.fullmatch(joined):
        raise TopicError(f"no Home Assistant id can be made from {parts!r}", reason="bad_id")
    return joined


def discovery_topic(prefix: str, component: str, node_id: str, object_id: str) -> str:
    """Home Assistant's discovery topic (its own layout, outside fedge's topic tree)."""
    levels = prefix.split("/")
    if not all(_PREFIX_LEVEL.fullmatch(level) for level in levels):
        raise TopicError(f"discovery prefix {prefix!r} is not a plain topic", reason="bad_topic")
    for value in (component, node_id, object_id):
        if not _HA_ID.fullmatch(value):
            raise TopicError(f"{value!r} is not a Home Assistant id", reason="bad_id")
    return "/".join([*levels, component, node_id, object_id, "config"])


def _sensor(
    status: str, key: str, name: str, template: str, **extra: Any
) -> tuple[str, str, dict[str, Any]]:
    return "sensor", key, {"name": name, "state_topic": status, "value_template": template, **extra}


def _counter(status: str, key: str, name: str, field: str) -> tuple[str, str, dict[str, Any]]:
    # The offline will carries no counters; 0 then reads as the reset a restart really is.
    template = f"{{{{ value_json.frames.{field} if value_json.frames else 0 }}}}"
    return _sensor(
        status,
        key,
        name,
        template,
        unit_of_measurement="frames",
        state_class="total_increasing",
        icon="mdi:image-multiple",
    )


def _entities(topics: Topics, agent: str) -> list[tuple[str, str, dict[str, Any]]]:
    status = topics.agent_status(agent)
    results = topics.agent_results(agent)
    dropped = (
        "{{ (value_json.frames.dropped_stale + value_json.frames.dropped_rate)"
        " if value_json.frames else 0 }}"
    )
    model = (
        "{{ (value_json.capabilities.model_version or 'none')"
        " if value_json.capabilities else 'none' }}"
    )
    return [
        (
            "binary_sensor",
            "status",
            {
                "name": "Status",
                "state_topic": status,
                "value_template": _STATE,
                "payload_on": ONLINE,
                "payload_off": OFFLINE,
                "device_class": "connectivity",
                "json_attributes_topic": status,
                "json_attributes_template": (
                    "{{ {'timestamp': value_json.timestamp,"
                    " 'samples_by_label': value_json.samples_by_label} | tojson }}"
                ),
            },
        ),
        _counter(status, "frames_received", "Frames received", "received"),
        _counter(status, "frames_processed", "Frames processed", "processed"),
        _counter(status, "frames_rejected", "Frames rejected", "rejected"),
        _sensor(
            status,
            "frames_dropped",
            "Frames dropped",
            dropped,
            unit_of_measurement="frames",
            state_class="total_increasing",
            icon="mdi:image-remove",
        ),
        _sensor(status, "model_version", "Model version", model, icon="mdi:brain"),
        _sensor(
            results,
            "last_label",
            "Last result",
            f"{{{{ {_TOP}.label if value_json.predictions else 'none' }}}}",
            json_attributes_topic=results,
            json_attributes_template=(
                "{{ {'source': value_json.source, 'frame_id': value_json.frame_id,"
                " 'model_version': value_json.model_version,"
                f" 'score': ({_TOP}.score if value_json.predictions else None)}} | tojson }}}}"
            ),
            icon="mdi:label",
        ),
        _sensor(
            results,
            "last_score",
            "Last score",
            f"{{{{ ({_TOP}.score | float) | round(4) if value_json.predictions else 0 }}}}",
            state_class="measurement",
            icon="mdi:percent",
        ),
        _sensor(
            results,
            "latency",
            "Inference latency",
            "{{ value_json.timings.total_ms | round(1) }}",
            unit_of_measurement="ms",
            device_class="duration",
            state_class="measurement",
        ),
    ]


def agent_discovery(
    topics: Topics, agent: str, *, prefix: str = DEFAULT_PREFIX, sw_version: str = __version__
) -> list[DiscoveryConfig]:
    """Every discovery config of ``agent``: one Home Assistant device, one entry per entity."""
    node = ha_id("fedge", *topics.root.split("/"), topics.fleet, agent)
    device = {
        "identifiers": [node],
        "name": f"fedge {agent}",
        "manufacturer": MANUFACTURER,
        "model": DEVICE_MODEL,
        "sw_version": sw_version,
    }
    # Every entity but the status itself follows the agent's retained status and its will.
    availability = [
        {
            "topic": topics.agent_status(agent),
            "value_template": _STATE,
            "payload_available": ONLINE,
            "payload_not_available": OFFLINE,
        }
    ]
    configs = []
    for component, key, fields in _entities(topics, agent):
        config: dict[str, Any] = {
            **fields,
            "unique_id": ha_id(node, key),
            "device": device,
            "origin": {"name": MANUFACTURER, "sw_version": sw_version},
        }
        if key != "status":
            config["availability"] = availability
        configs.append(DiscoveryConfig(discovery_topic(prefix, component, node, key), config))
    return configs
