"""The production broker set-up: Mosquitto with TLS, hashed passwords and per-client ACLs.

The broker runs the shipped ``deploy/mosquitto/mosquitto.conf`` with only its paths and
port replaced, and the password and ACL files that ``fedge deploy mosquitto-acl`` writes.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import socket
import ssl
import subprocess
import threading
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from coordinator.rounds import RoundPlan
from fedge.deploy import Access, Role, acl_text, deploy_group, fleet_clients
from fedge.harness.federation import federation
from protocol.errors import ConfigError, FedgeError
from protocol.topics import Topics, topic_matches
from tests.brokers import (
    CONNECT_TIMEOUT_S,
    LOOPBACK,
    START_TIMEOUT_S,
    MessageCollector,
    Received,
    disconnect,
    free_port,
    publish,
    wait_until,
)

pytestmark = [pytest.mark.broker, pytest.mark.system]

PRODUCTION_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"
AGENT_A, AGENT_B = "agent-00", "agent-01"  # the ids fedge.harness.federation gives its agents
COORDINATOR, OPERATOR, CAMERA, ADMIN = "coordinator", "operator", "door", "test-admin"
ACK_TIMEOUT_S = 30.0
CERT_LIFETIME = datetime.timedelta(days=2)


# --- pure: the ACL grants each role exactly its topics -------------------------------------


def _parse_acl(text: str) -> dict[str, list[tuple[str, str]]]:
    """``{user: [(access, filter), ...]}`` from Mosquitto ACL text."""
    users: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            current = users.setdefault(words[1], [])
        else:
            assert words[0] == "topic", line
            assert current is not None, line
            current.append((words[1], words[2]))
    return users


def _allowed(rules: list[tuple[str, str]], want: str, topic: str) -> bool:
    return any(
        access in {want, Access.READWRITE} and topic_matches(topic_filter, topic)
        for access, topic_filter in rules
    )


def test_acl_grants_each_role_only_its_own_topics() -> None:
    t = Topics(root="site/a", fleet="barn")
    acl = _parse_acl(
        acl_text(t, agents=["pi-1", "pi-2"], cameras=["door"], operator="ops", coordinator="co")
    )
    assert set(acl) == {"co", "pi-1", "pi-2", "door", "ops"}
    for access, _filter in (rule for rules in acl.values() for rule in rules):
        assert access in {"read", "write"}  # nobody needs readwrite
    pi1, co, door, ops = acl["pi-1"], acl["co"], acl["door"], acl["ops"]
    own_writes = [
        t.agent_status("pi-1"),
        t.agent_events("pi-1"),
        t.agent_results("pi-1"),
        t.update_manifest(3, "pi-1"),
        t.update_chunk(3, "pi-1", 7),
    ]
    assert all(_allowed(pi1, "write", topic) for topic in own_writes)
    foreign_writes = [
        t.agent_status("pi-2"),
        t.agent_results("pi-2"),
        t.agent_events("pi-2"),
        t.update_chunk(3, "pi-2", 7),
        t.agent_commands("pi-2"),
        t.agent_commands("pi-1"),
        t.coordinator_status(),
        t.coordinator_events(),
        t.coordinator_commands(),
        t.round_current(),
        t.model_manifest("r1"),
        t.blob_chunk("abc", 0),
        t.camera_frames("door"),
    ]
    assert not any(_allowed(pi1, "write", topic) for topic in foreign_writes)
    reads = [
        t.camera_frames("door"),
        t.agent_commands("pi-1"),
        t.round_current(),
        t.model_manifest("r1"),
        t.blob_chunk("abc", 4),
        t.coordinator_status(),
        t.coordinator_events(),
    ]
    assert all(_allowed(pi1, "read", topic) for topic in reads)
    hidden = [
        t.agent_commands("pi-2"),
        t.agent_results("pi-2"),
        t.agent_status("pi-2"),
        t.update_chunk(3, "pi-2", 0),
        t.coordinator_commands(),
    ]
    assert not any(_allowed(pi1, "read", topic) for topic in hidden)
    coordinator_writes = [
        t.coordinator_status(),
        t.coordinator_events(),
        t.round_current(),
        t.model_manifest("r1"),
        t.model_chunk("r1", 2),
        t.blob_chunk("abc", 1),
    ]
    assert all(_allowed(co, "write", topic) for topic in coordinator_writes)
    assert not _allowed(co, "write", t.agent_results("pi-1"))
    assert not _allowed(co, "write", t.update_chunk(1, "pi-1", 0))
    for topic in (t.agent_status("pi-2"), t.coordinator_commands(), t.update_chunk(9, "pi-2", 3)):
        assert _allowed(co, "read", topic)
    assert not _allowed(co, "read", t.agent_results("pi-1"))
    assert door == [("write", t.camera_frames("door"))]
    assert _allowed(ops, "write", t.coordinator_commands())
    assert _allowed(ops, "read", t.coordinator_status())
    assert not _allowed(ops, "write", t.round_current())
    assert not _allowed(ops, "write", t.model_manifest("r1"))


def test_fleet_clients_refuse_duplicate_or_unsafe_user_names() -> None:
    t = Topics()
    with pytest.raises(ConfigError, match="twice"):
        fleet_clients(t, agents=["pi-1", "pi-1"])
    with pytest.raises(ConfigError, match="twice"):
        fleet_clients(t, agents=["coordinator"])
    with pytest.raises(ConfigError):
        fleet_clients(t, agents=["pi 1"])
    with pytest.raises(ConfigError):
        fleet_clients(t, agents=["pi-1"], operator="ops:admin")
    with pytest.raises(ConfigError, match="at least one agent"):
        fleet_clients(t, agents=[])
    roles = [c.role for c in fleet_clients(t, agents=["a", "b"], cameras=["c"], operator="o")]
    assert roles == [Role.COORDINATOR, Role.AGENT, Role.AGENT, Role.CAMERA, Role.OPERATOR]


# --- the broker ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_pki(directory: Path) -> Pki:
    """A CA and a server certificate for 127.0.0.1 (IP SAN: hostname checks stay on)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedge test CA"))
        .issuer_name(_name("fedge test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_LIFETIME)
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(LOOPBACK))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_LIFETIME)
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.key_file.chmod(0o600)
    return pki


def _broker_config(workdir: Path, port: int, pki: Pki, auth_dir: Path) -> str:
    """The shipped config with paths and port replaced; each replaced line must exist once."""
    replacements = {
        "listener": f"listener {port} {LOOPBACK}",
        "cafile": f"cafile {pki.ca_file}",
        "certfile": f"certfile {pki.cert_file}",
        "keyfile": f"keyfile {pki.key_file}",
        "password_file": f"password_file {auth_dir / 'passwords'}",
        "acl_file": f"acl_file {auth_dir / 'acl'}",
        "persistence_location": f"persistence_location {workdir}/",
        "log_dest": f"log_dest file {workdir / 'mosquitto.log'}",
    }
    seen: list[str] = []
    lines = []
    for line in PRODUCTION_CONFIG.read_text(encoding="utf-8").splitlines():
        key = line.split(" ", 1)[0]
        if key in replacements:
            seen.append(key)
        lines.append(replacements.get(key, line))
    assert sorted(seen) == sorted(replacements), "the shipped mosquitto.conf changed shape"
    # As root, Mosquitto would switch to the `mosquitto` user and lose access to workdir.
    lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
    return "\n".join(lines) + "\n"


@dataclass
class SecureBroker:
    port: int
    pki: Pki
    topics: Topics
    passwords: dict[str, str]
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def url(self) -> str:
        return f"mqtts://{LOOPBACK}:{self.port}"

    # Agents read credentials from their own config, not from the broker object.
    username: None = None
    password: None = None

    def log_text(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: Path
) -> Iterator[SecureBroker]:
    binary = mosquitto_binary
    workdir = tmp_path_factory.mktemp("secure-mosquitto")
    topics = Topics(root=f"t-secure-{uuid.uuid4().hex[:8]}", fleet="test")
    auth_dir = workdir / "auth"
    result = CliRunner().invoke(
        deploy_group,
        [
            "mosquitto-acl",
            "--agents",
            f"{AGENT_A},{AGENT_B}",
            "--coordinator",
            COORDINATOR,
            "--operator",
            OPERATOR,
            "--camera",
            CAMERA,
            "--fleet",
            topics.fleet,
            "--root",
            topics.root,
            "--out",
            str(auth_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    credentials = tomllib.loads((auth_dir / "credentials.toml").read_text())["clients"]
    passwords = {user: entry["password"] for user, entry in credentials.items()}
    # A test-only user that sees and may write everything, to observe what the ACL drops.
    passwords[ADMIN] = uuid.uuid4().hex
    subprocess.run(
        ["mosquitto_passwd", "-b", str(auth_dir / "passwords"), ADMIN, passwords[ADMIN]],
        check=True,
        capture_output=True,
    )
    with (auth_dir / "acl").open("a") as acl:
        acl.write(f"\nuser {ADMIN}\ntopic readwrite #\n")
    pki = _write_pki(workdir / "pki")
    port = free_port()
    config_path = workdir / "mosquitto.conf"
    config_path.write_text(_broker_config(workdir, port, pki, auth_dir))
    with (workdir / "mosquitto.out").open("ab") as output:
        process = subprocess.Popen(
            [str(binary), "-c", str(config_path)], stdout=output, stderr=subprocess.STDOUT
        )
    broker = SecureBroker(port, pki, topics, passwords, workdir, process)
    try:
        wait_until(
            lambda: _port_open(port) or process.poll() is not None,
            START_TIMEOUT_S,
            what="the TLS listener",
        )
        assert process.poll() is None, (workdir / "mosquitto.out").read_text() + broker.log_text()
        yield broker
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class TlsClient:
    """A paho client over TLS that records its CONNACK and SUBACK codes."""

    def __init__(
        self,
        broker: SecureBroker,
        username: str | None,
        *,
        ca_file: Path | None = None,
        password: str | None = None,
    ) -> None:
        self.collector = MessageCollector()
        self._condition = threading.Condition()
        self.connack: ReasonCode | None = None
        self._subacks: dict[int, list[ReasonCode]] = {}
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:12]}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        # Only the given CA, or with None the system's CAs, which do not know the test CA.
        client.tls_set(ca_certs=str(ca_file) if ca_file else None)
        if username is not None:
            client.username_pw_set(username, password or broker.passwords[username])
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self.collector.on_message
        self.client = client
        self._broker = broker

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        with self._condition:
            self.connack = reason
            self._condition.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._condition:
            self._subacks[mid] = list(reasons)
            self._condition.notify_all()

    def connect(self) -> ReasonCode:
        self.client.connect(LOOPBACK, self._broker.port)
        self.client.loop_start()
        with self._condition:
            assert self._condition.wait_for(lambda: self.connack is not None, CONNECT_TIMEOUT_S)
            assert self.connack is not None
            return self.connack

    def subscribe(self, topic_filter: str) -> ReasonCode:
        result, mid = self.client.subscribe(topic_filter, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert mid is not None
        with self._condition:
            assert self._condition.wait_for(lambda: mid in self._subacks, ACK_TIMEOUT_S)
            (reason,) = self._subacks.pop(mid)
        return reason

    def close(self) -> None:
        disconnect(self.client)


@pytest.fixture
def connect(secure_broker: SecureBroker) -> Iterator[Any]:
    """``connect(user)``: a client of ``user`` with the CA, connected; closed after the test."""
    clients: list[TlsClient] = []

    def make(username: str) -> TlsClient:
        client = TlsClient(secure_broker, username, ca_file=secure_broker.pki.ca_file)
        clients.append(client)
        reason = client.connect()
        assert not reason.is_failure, reason
        return client

    yield make
    for client in clients:
        client.close()


def test_password_file_is_hashed_and_credentials_are_private(secure_broker: SecureBroker) -> None:
    auth_dir = secure_broker.workdir / "auth"
    hashed = (auth_dir / "passwords").read_text()
    assert f"{AGENT_A}:$7$" in hashed  # PBKDF2-SHA512
    assert not any(password in hashed for password in secure_broker.passwords.values())
    assert (auth_dir / "credentials.toml").stat().st_mode & 0o777 == 0o600
    again = CliRunner().invoke(
        deploy_group, ["mosquitto-acl", "--agents", AGENT_A, "--out", str(auth_dir)]
    )
    assert again.exit_code == 2
    assert "--force" in again.output


def test_clients_without_credentials_or_without_the_ca_are_refused(
    secure_broker: SecureBroker,
) -> None:
    anonymous = TlsClient(secure_broker, None, ca_file=secure_broker.pki.ca_file)
    wrong = TlsClient(
        secure_broker, AGENT_A, ca_file=secure_broker.pki.ca_file, password="not-the-password"
    )
    try:
        assert anonymous.connect() == "Not authorized"
        assert wrong.connect().is_failure
    finally:
        anonymous.close()
        wrong.close()
    # Without the fleet's CA (the system's CAs only) the handshake fails before any MQTT.
    # Plain ssl rather than paho: paho leaves the socket of a failed handshake open.
    system_cas = ssl.create_default_context()
    with (
        socket.create_connection((LOOPBACK, secure_broker.port), timeout=CONNECT_TIMEOUT_S) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        system_cas.wrap_socket(raw, server_hostname=LOOPBACK)


def test_an_agent_cannot_publish_as_another_agent_or_the_coordinator(
    secure_broker: SecureBroker, connect: Any
) -> None:
    t = secure_broker.topics
    admin = connect(ADMIN)
    assert not admin.subscribe("#").is_failure
    agent = connect(AGENT_A)
    forged = f"forged-{uuid.uuid4().hex}".encode()
    forbidden = [
        t.agent_results(AGENT_B),
        t.agent_status(AGENT_B),
        t.agent_events(AGENT_B),
        t.update_manifest(1, AGENT_B),
        t.update_chunk(1, AGENT_B, 0),
        t.agent_commands(AGENT_B),
        t.coordinator_status(),
        t.coordinator_commands(),
        t.round_current(),
        t.model_manifest("r9"),
        t.blob_chunk("abc", 0),
        t.camera_frames(CAMERA),
    ]
    for topic in forbidden:
        # MQTT 3.1.1 has no way to say "denied": the broker acknowledges and drops.
        publish(agent.client, topic, forged, qos=1)
    allowed = [t.agent_status(AGENT_A), t.update_chunk(1, AGENT_A, 0), t.agent_results(AGENT_A)]
    for topic in allowed:
        publish(agent.client, topic, forged, qos=1)

    def forged_seen(messages: list[Received]) -> list[str]:
        return [m.topic for m in messages if m.payload == forged]

    # One client's messages reach a subscriber in order: once the last allowed one is
    # there, every earlier one that the broker let through is there too.
    admin.collector.wait_for(lambda msgs: t.agent_results(AGENT_A) in forged_seen(msgs))
    assert forged_seen(admin.collector.messages) == allowed


def test_an_agent_cannot_read_another_agents_commands(
    secure_broker: SecureBroker, connect: Any
) -> None:
    t = secure_broker.topics
    agent_a, agent_b, admin = connect(AGENT_A), connect(AGENT_B), connect(ADMIN)
    assert not agent_a.subscribe(t.agent_commands(AGENT_A)).is_failure
    # Mosquitto 2.0 grants these in the SUBACK and checks read access per delivered message.
    agent_a.subscribe(t.agent_commands(AGENT_B))
    agent_a.subscribe("#")
    assert not agent_b.subscribe(t.agent_commands(AGENT_B)).is_failure
    marker = uuid.uuid4().hex.encode()
    publish(admin.client, t.agent_commands(AGENT_B), marker)
    publish(admin.client, t.agent_commands(AGENT_A), marker)
    agent_b.collector.wait_for_topic(t.agent_commands(AGENT_B))
    agent_a.collector.wait_for_topic(t.agent_commands(AGENT_A))
    assert agent_a.collector.on_topic(t.agent_commands(AGENT_B)) == []


def test_a_federated_round_through_tls_and_the_acl(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    per_agent = {
        agent: {"username": agent, "password": secure_broker.passwords[agent]}
        for agent in (AGENT_A, AGENT_B)
    }
    with federation(
        tmp_path,
        secure_broker,
        secure_broker.topics,
        num_agents=2,
        trainer="litert",
        per_agent=per_agent,
        ca_file=secure_broker.pki.ca_file,
    ) as fed:
        coordinator = fed.start_coordinator(
            username=COORDINATOR,
            password=secure_broker.passwords[COORDINATOR],
            ca_file=secure_broker.pki.ca_file,
        )
        fed.wait_for_agents(2)
        (outcome,) = coordinator.run_plan_now(RoundPlan(rounds=1, min_agents=2, deadline_s=90.0))
        logs = "\n".join(agent.log()[-3000:] for agent in fed.agents)
        assert outcome.ok, f"{outcome.reason}\n{logs}\n{secure_broker.log_text()[-3000:]}"
        assert outcome.metrics["updates"] == 2
        for agent in fed.agents:
            assert "Traceback" not in agent.log(), agent.log()
    log = secure_broker.log_text()
    for user in (AGENT_A, AGENT_B, COORDINATOR):
        assert f"u'{user}'" in log  # each connected as its own broker user


def test_an_agent_cannot_make_the_coordinator_believe_in_another_agent_or_a_phantom(
    secure_broker: SecureBroker, connect: Any, tmp_path: Path
) -> None:
    """The ACL guards topics; identity comes from the topic, so payload claims are refused."""
    from coordinator.config import load_coordinator_config
    from coordinator.daemon import Coordinator
    from protocol.messages.agent import AgentState, AgentStatus, Capabilities, ErrorEvent
    from protocol.messages.codec import decode_message, encode_message
    from protocol.messages.rounds import UpdateComplete, UpdateEncoding
    from protocol.signing import write_key_pair

    t = secure_broker.topics
    private, _public = write_key_pair(tmp_path / "keys")
    coordinator = Coordinator(
        load_coordinator_config(
            broker_url=secure_broker.url,
            username=COORDINATOR,
            password=secure_broker.passwords[COORDINATOR],
            ca_file=secure_broker.pki.ca_file,
            fleet=t.fleet,
            topic_root=t.root,
            data_dir=tmp_path / "coordinator",
            signing_key=private,
            status_interval_s=3600.0,
        )
    )
    coordinator.start()
    try:
        coordinator.fleet._follow_round(1)  # the update topics of an open round
        coordinator.link.wait_connected(ACK_TIMEOUT_S)
        admin = connect(ADMIN)
        assert not admin.subscribe(t.coordinator_events()).is_failure
        agent = connect(AGENT_A)
        phantom = f"phantom-{uuid.uuid4().hex[:6]}"

        def status(claimed: str) -> bytes:
            return encode_message(
                AgentStatus(
                    agent=claimed,
                    state=AgentState.ONLINE,
                    timestamp=1.0,
                    capabilities=Capabilities(runtime="x", can_train=True, trainers=("litert",)),
                )
            )

        # On its own status topic, claiming B or a phantom: refused by the coordinator.
        publish(agent.client, t.agent_status(AGENT_A), status(AGENT_B), qos=1)
        publish(agent.client, t.agent_status(AGENT_A), status(phantom), qos=1)
        # On B's or a phantom's topic: dropped by the broker's ACL.
        publish(agent.client, t.agent_status(AGENT_B), status(AGENT_B), qos=1)
        publish(agent.client, t.agent_status(phantom), status(phantom), qos=1)
        # An update completion on its own topic in B's name: refused.
        complete = UpdateComplete(
            round=1,
            agent=AGENT_B,
            base_model_version="r0",
            update_sha256="0" * 64,
            update_size_bytes=10,
            chunk_count=1,
            chunk_bytes=10,
            encoding=UpdateEncoding.FLOAT32,
            num_examples=1,
        )
        publish(agent.client, t.update_manifest(1, AGENT_A), encode_message(complete), qos=1)

        def refusals(messages: list[Received]) -> list[ErrorEvent]:
            events: list[ErrorEvent] = []
            for message in messages:
                try:
                    event: object = decode_message(message.payload)
                except FedgeError:
                    continue
                if isinstance(event, ErrorEvent) and event.reason == "wrong_agent":
                    events.append(event)
            return events

        # One client's messages are handled in order: the last refusal means all were seen.
        admin.collector.wait_for(
            lambda messages: any("rounds/1" in e.message for e in refusals(messages))
        )
        messages = [e.message for e in refusals(admin.collector.messages)]
        assert any(AGENT_B in m and AGENT_A in m for m in messages), messages
        assert any(phantom in m for m in messages), messages
        known = coordinator.fleet.agents()
        # B may be known from its own (retained, offline) status; A's claims changed nothing.
        assert AGENT_B not in known or not known[AGENT_B].online, known
        assert phantom not in known
    finally:
        coordinator.stop()
