"""``fedge deploy mosquitto-bridge``: the topics a site bridge carries, and the config it writes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedge.bridge import Direction, Remote, bridge_acl, bridge_config, bridge_topics
from fedge.cli import cli
from protocol.topics import Topics, topic_matches
from tests.brokers import MosquittoProcess, find_mosquitto, free_port

TOPICS = Topics(root="fedge", fleet="farm")
DIGEST = "ab" * 32


def _directions(topic: str, **options: bool) -> list[Direction]:
    return [
        carried.direction
        for carried in bridge_topics(TOPICS, **options)
        if topic_matches(carried.topic_filter, topic)
    ]


@pytest.mark.parametrize(
    "topic",
    [
        TOPICS.agent_status("pi-1"),
        TOPICS.agent_events("pi-1"),
        TOPICS.agent_results("pi-1"),
        TOPICS.update_manifest(7, "pi-1"),
        TOPICS.update_chunk(7, "pi-1", 3),
        TOPICS.coordinator_commands(),
    ],
)
def test_what_site_clients_send_goes_out_once(topic: str) -> None:
    assert _directions(topic) == [Direction.OUT]


@pytest.mark.parametrize(
    "topic",
    [
        TOPICS.round_current(),
        TOPICS.model_manifest("r3"),
        TOPICS.blob_chunk(DIGEST, 0),
        TOPICS.coordinator_status(),
        TOPICS.coordinator_events(),
        TOPICS.agent_commands("pi-1"),
    ],
)
def test_what_the_coordinator_sends_comes_in_once(topic: str) -> None:
    assert _directions(topic) == [Direction.IN]


def test_frames_stay_at_the_site_unless_asked_and_results_can_stay_too() -> None:
    frames = TOPICS.camera_frames("door")
    assert _directions(frames) == []
    assert _directions(frames, frames=True) == [Direction.OUT]
    assert _directions(TOPICS.agent_results("pi-1"), results=False) == []
    assert _directions(Topics(root="fedge", fleet="other").agent_status("pi-1")) == []


def test_config_has_a_persistent_qos1_bridge_with_tls_and_credentials(tmp_path: Path) -> None:
    remote = Remote(
        host="central.example.net",
        port=8883,
        username="bridge-farm",
        password="s3cret",
        ca_file=tmp_path / "ca.crt",
    )
    lines = bridge_config(TOPICS, site="barn", remote=remote).splitlines()
    for expected in (
        "connection fedge-bridge-barn",
        "address central.example.net:8883",
        "cleansession false",
        "remote_clientid fedge-bridge-barn",
        "remote_username bridge-farm",
        "remote_password s3cret",
        f"bridge_cafile {tmp_path / 'ca.crt'}",
        "bridge_insecure false",
        "topic fedge/farm/rounds/+/updates/# out 1",
        "topic fedge/farm/blobs/+/chunks/+ in 1",
    ):
        assert expected in lines
    plain = bridge_config(TOPICS, site="barn", remote=Remote(host="10.0.0.5", port=1883))
    assert "bridge_cafile" not in plain
    assert "remote_username" not in plain
    acl = bridge_acl(TOPICS, site="barn", username="bridge-farm").splitlines()
    assert acl[0] == "user bridge-farm"
    assert "topic write fedge/farm/rounds/+/updates/#" in acl
    assert "topic read fedge/farm/rounds/current" in acl


@pytest.mark.broker
def test_mosquitto_accepts_the_written_config(tmp_path: Path) -> None:
    binary = find_mosquitto()
    assert binary is not None, "these tests need a real Mosquitto"
    out = tmp_path / "fedge-bridge.conf"
    result = CliRunner().invoke(
        cli,
        [
            "deploy",
            "mosquitto-bridge",
            "--site",
            "barn",
            "--central",
            f"127.0.0.1:{free_port()}",  # nobody there: the site broker keeps retrying
            "--username",
            "bridge-barn",
            "--out",
            str(out),
        ],
        env={"FEDGE_BRIDGE_PASSWORD": "from-the-environment"},
    )
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "remote_password from-the-environment" in out.read_text()
    assert "user bridge-barn" in result.output
    site = MosquittoProcess(binary, tmp_path / "site", extra_config=out.read_text().splitlines())
    site.start()
    site.stop()
    again = CliRunner().invoke(
        cli, ["deploy", "mosquitto-bridge", "--site", "barn", "--central", "x", "--out", str(out)]
    )
    assert again.exit_code == 2
    assert "already exists" in again.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--site", "bad/site", "--central", "h"], "site id"),
        (["--site", "s", "--central", "h:notaport"], "HOST:PORT"),
        (["--site", "s", "--central", "h", "--ca-file", "/nonexistent/ca.crt"], "does not exist"),
    ],
)
def test_mistakes_give_one_line_and_status_2(arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["deploy", "mosquitto-bridge", *arguments])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
