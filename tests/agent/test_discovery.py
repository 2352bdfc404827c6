"""Home Assistant MQTT discovery: configs valid for Home Assistant, published retained."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.config import load_agent_config
from agent.discovery import DEFAULT_PREFIX, DiscoveryConfig, agent_discovery, discovery_topic, ha_id
from coordinator.tflite_export import ReferenceModels
from protocol.errors import ConfigError, TopicError
from protocol.topics import Topics
from tests.agent.agent_helpers import (
    RESULT_TIMEOUT_S,
    agent_settings,
    held_out_digits,
    running_agent,
)
from tests.brokers import (
    MessageCollector,
    MosquittoProcess,
    Received,
    disconnect,
    mqtt_client,
    publish,
    subscribe,
)

HA_ID = re.compile(r"[a-zA-Z0-9_-]+")
TEMPLATE_PATH = re.compile(r"value_json((?:\.[a-z_]+|\[\d+\])+)")
STEP = re.compile(r"\.([a-z_]+)|\[(\d+)\]")

_TEXT = {"type": "string", "minLength": 1}
_TEMPLATE = {"type": "string", "pattern": r"^\{[{%].*[}%]\}$"}
_AVAILABILITY = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["topic"],
        "additionalProperties": False,
        "properties": {
            "topic": _TEXT,
            "value_template": _TEMPLATE,
            "payload_available": _TEXT,
            "payload_not_available": _TEXT,
        },
    },
}
_DEVICE = {
    "type": "object",
    "required": ["identifiers", "name"],
    "additionalProperties": False,
    "properties": {
        "identifiers": {"type": "array", "minItems": 1, "items": _TEXT},
        "connections": {"type": "array"},
        "name": _TEXT,
        "manufacturer": _TEXT,
        "model": _TEXT,
        "sw_version": _TEXT,
        "hw_version": _TEXT,
        "suggested_area": _TEXT,
        "configuration_url": _TEXT,
        "via_device": _TEXT,
    },
}
# Keys every MQTT entity platform shares, as documented for Home Assistant's MQTT discovery.
_COMMON = {
    "name": {"type": ["string", "null"]},
    "unique_id": {"type": "string", "pattern": r"^[a-zA-Z0-9_-]+$"},
    "state_topic": _TEXT,
    "value_template": _TEMPLATE,
    "availability": _AVAILABILITY,
    "availability_topic": _TEXT,
    "availability_mode": {"enum": ["all", "any", "latest"]},
    "payload_available": _TEXT,
    "payload_not_available": _TEXT,
    "json_attributes_topic": _TEXT,
    "json_attributes_template": _TEMPLATE,
    "device": _DEVICE,
    "origin": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": _TEXT, "sw_version": _TEXT, "support_url": _TEXT},
        "additionalProperties": False,
    },
    "icon": {"type": "string", "pattern": r"^mdi:[a-z0-9-]+$"},
    "entity_category": {"enum": ["config", "diagnostic"]},
    "enabled_by_default": {"type": "boolean"},
    "expire_after": {"type": "integer", "minimum": 0},
    "force_update": {"type": "boolean"},
    "qos": {"enum": [0, 1, 2]},
    "device_class": {"type": ["string", "null"]},
}
SENSOR_SCHEMA = {
    "type": "object",
    # unique_id and device are optional for Home Assistant but needed to group a device.
    "required": ["state_topic", "unique_id", "device"],
    "additionalProperties": False,
    "properties": {
        **_COMMON,
        "unit_of_measurement": _TEXT,
        "state_class": {"enum": ["measurement", "measurement_angle", "total", "total_increasing"]},
        "suggested_display_precision": {"type": "integer", "minimum": 0},
        "last_reset_value_template": _TEMPLATE,
    },
    "allOf": [
        {
            "if": {
                "properties": {"device_class": {"const": "duration"}},
                "required": ["device_class"],
            },
            "then": {
                "required": ["unit_of_measurement"],
                "properties": {"unit_of_measurement": {"enum": ["d", "h", "min", "s", "ms"]}},
            },
        }
    ],
}
BINARY_SENSOR_SCHEMA = {
    "type": "object",
    "required": ["state_topic", "unique_id", "device"],
    "additionalProperties": False,
    "properties": {
        **_COMMON,
        "payload_on": _TEXT,
        "payload_off": _TEXT,
        "off_delay": {"type": "integer", "minimum": 0},
        "device_class": {
            "enum": ["connectivity", "problem", "running", "motion", "occupancy", "presence"]
        },
    },
}
SCHEMAS = {"sensor": SENSOR_SCHEMA, "binary_sensor": BINARY_SENSOR_SCHEMA}


def _parts(entity: DiscoveryConfig, prefix: str) -> tuple[str, str, str]:
    assert entity.topic.startswith(prefix + "/")
    component, node, object_id, leaf = entity.topic[len(prefix) + 1 :].split("/")
    assert leaf == "config"
    return component, node, object_id


def _resolve(document: Any, path: str) -> Any:
    for key, index in STEP.findall(path):
        if key:
            assert isinstance(document, dict), f"{path}: {document!r} is not an object"
            assert key in document, f"{path}: no {key!r} in {sorted(document)}"
            document = document[key]
        else:
            assert isinstance(document, list), f"{path}: {document!r} is not a list"
            document = document[int(index)]
    return document


def _template_paths(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(topic, path) for every ``value_json`` path a template of ``config`` reads."""
    found = [
        (config[topic_key], path)
        for template_key, topic_key in (
            ("value_template", "state_topic"),
            ("json_attributes_template", "json_attributes_topic"),
        )
        for path in TEMPLATE_PATH.findall(config.get(template_key, ""))
    ]
    found += [
        (availability["topic"], path)
        for availability in config.get("availability", [])
        for path in TEMPLATE_PATH.findall(availability.get("value_template", ""))
    ]
    return found


def test_every_config_validates_against_home_assistants_schema() -> None:
    topics = Topics(root="fedge", fleet="default")
    configs = agent_discovery(topics, "pi-1")
    components = {}
    for entity in configs:
        component, node, object_id = _parts(entity, DEFAULT_PREFIX)
        jsonschema.validate(json.loads(entity.payload), SCHEMAS[component])
        assert HA_ID.fullmatch(node)
        assert HA_ID.fullmatch(object_id)
        components[object_id] = component
    assert components["status"] == "binary_sensor"
    assert {"frames_processed", "frames_received", "last_label", "last_score"} <= set(components)
    assert len({entity.config["unique_id"] for entity in configs}) == len(configs)
    assert len({json.dumps(entity.config["device"]) for entity in configs}) == 1
    by_id = {_parts(entity, DEFAULT_PREFIX)[2]: entity.config for entity in configs}
    assert by_id["status"]["state_topic"] == topics.agent_status("pi-1")
    assert by_id["status"]["value_template"] == "{{ value_json.state }}"
    assert "availability" not in by_id["status"]  # it reports offline itself
    assert by_id["frames_processed"]["state_class"] == "total_increasing"
    assert by_id["last_label"]["state_topic"] == topics.agent_results("pi-1")
    assert by_id["frames_processed"]["availability"][0]["topic"] == topics.agent_status("pi-1")


def test_ids_with_dots_and_nested_roots_are_sanitised() -> None:
    topics = Topics(root="site.a/edge", fleet="lab.2")
    configs = agent_discovery(topics, "pi.kitchen", prefix="ha/discovery")
    for entity in configs:
        component, node, _ = _parts(entity, "ha/discovery")
        jsonschema.validate(entity.config, SCHEMAS[component])
        assert node == "fedge_site_a_edge_lab_2_pi_kitchen"
        assert HA_ID.fullmatch(entity.config["unique_id"])
        assert entity.config["state_topic"].startswith("site.a/edge/lab.2/agents/pi.kitchen/")
    # Different agents never share a device or an entity.
    other = agent_discovery(topics, "pi-kitchen", prefix="ha/discovery")
    assert not {e.config["unique_id"] for e in configs} & {e.config["unique_id"] for e in other}


def test_bad_prefixes_and_ids_are_refused(tmp_path: Path) -> None:
    for prefix in ("", "ha/+", "ha/#", "ha//x", "/ha"):
        with pytest.raises(TopicError):
            discovery_topic(prefix, "sensor", "node", "object")
    with pytest.raises(TopicError):
        discovery_topic("homeassistant", "sensor", "no.dots", "object")
    with pytest.raises(TopicError):
        ha_id("", "")
    with pytest.raises(ConfigError):
        load_agent_config(agent_id="pi-1", data_dir=tmp_path, home_assistant_prefix="ha/#")


@pytest.mark.broker
def test_agent_publishes_retained_configs_whose_templates_match_its_messages(
    mosquitto: MosquittoProcess,
    topics: Topics,
    reference_models: ReferenceModels,
    tmp_path: Path,
) -> None:
    prefix = f"ha-{topics.root}"
    expected = agent_discovery(topics, "pi-1", prefix=prefix)
    settings = agent_settings(
        mosquitto,
        topics,
        tmp_path,
        reference_models,
        home_assistant_discovery=True,
        home_assistant_prefix=prefix,
    )
    (image,), _ = held_out_digits(1)
    wanted = {entity.topic for entity in expected}
    collector = MessageCollector()
    with running_agent(**settings):
        client = mqtt_client(mosquitto, collector=collector)
        try:
            subscribe(client, f"{prefix}/#")
            subscribe(client, f"{topics.root}/#")
            collector.wait_for(lambda ms: wanted <= {m.topic for m in ms}, RESULT_TIMEOUT_S)
            publish(client, topics.camera_frames("cam"), image)
            collector.wait_for_topic(topics.agent_results("pi-1"), 1, RESULT_TIMEOUT_S)
        finally:
            disconnect(client)
        # A subscriber that comes later still gets every config: they are retained.
        late = MessageCollector()
        late_client = mqtt_client(mosquitto, collector=late)
        try:
            subscribe(late_client, f"{prefix}/#")
            configs = late.wait_for(lambda ms: wanted <= {m.topic for m in ms}, RESULT_TIMEOUT_S)
        finally:
            disconnect(late_client)
    assert all(m.retain for m in configs if m.topic in wanted)
    by_topic: dict[str, Received] = {m.topic: m for m in configs}
    for entity in expected:
        assert json.loads(by_topic[entity.topic].payload) == entity.config
    # Every value_json path the templates read exists in what the agent really sent.
    latest = {
        m.topic: json.loads(m.payload)
        for m in collector.messages
        if m.topic in {topics.agent_status("pi-1"), topics.agent_results("pi-1")}
    }
    checked = 0
    for entity in expected:
        for topic, path in _template_paths(entity.config):
            _resolve(latest[topic], path)
            checked += 1
    assert checked >= len(expected)
    assert latest[topics.agent_results("pi-1")]["predictions"][0]["label"] in set("0123456789")
