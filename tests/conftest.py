"""Fixtures every test may use: real brokers, unique topics, and a guard on logged errors.

Brokers (implemented in ``tests/brokers.py``): ``mosquitto`` (session, shared: never stop
it), ``fresh_mosquitto`` (per test, free to stop, kill and restart) and ``amqtt_broker``
(session, fedge's embedded broker). Each has ``host``, ``port``, ``url``, ``username`` and
``password`` (``None`` for Mosquitto); connect with :func:`tests.brokers.mqtt_client`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.topics import Topics
from runtime.failures import HANDLER_FAILURES_ENV
from tests.brokers import AmqttProcess, MosquittoProcess
from tests.system_packages import ensure_program

pytest_plugins = ["tests.fixtures_models", "tests.agent.detectors"]

ALLOW_LOGGED_ERRORS = "allow_logged_errors"
_ROOT_PREFIX = "t-"
_MAX_ROOT_CHARS = 64
_SUFFIX_HEX_CHARS = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def pytest_configure(config: pytest.Config) -> None:
    # Every MQTT link of this run, in this process or in any process it starts (agents,
    # coordinators, the CLI), records here what reached its last-resort handler.
    os.environ[HANDLER_FAILURES_ENV] = tempfile.mkdtemp(prefix="fedge-handler-failures-")
    config.addinivalue_line(
        "markers",
        f"{ALLOW_LOGGED_ERRORS}: the test expects errors logged with a traceback; do not fail it",
    )


# --- brokers ---------------------------------------------------------------------------


# Mosquitto's clients come with it: `mosquitto_pub -f photo.jpg` is how README feeds an agent.
MOSQUITTO_PACKAGES = ("mosquitto", "mosquitto-clients")


@pytest.fixture(scope="session")
def mosquitto_binary() -> Path:
    """The mosquitto binary; Mosquitto and its clients are installed with apt when missing."""
    return ensure_program("mosquitto", MOSQUITTO_PACKAGES)


@pytest.fixture(scope="session")
def mosquitto_pub() -> Path:
    """The ``mosquitto_pub`` client, installed with Mosquitto when missing."""
    return ensure_program("mosquitto_pub", MOSQUITTO_PACKAGES)


@pytest.fixture(scope="session")
def mosquitto(
    tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: Path
) -> Iterator[MosquittoProcess]:
    """One Mosquitto (2.0, persistence on) on a free loopback port for the whole session.

    Shared by every test: never stop, kill or restart it (use ``fresh_mosquitto``).
    Verified here: retained messages, QoS 1 round trips, QoS 1 to an offline persistent
    session (paho clean_session=False, MQTT 3.1.1), last wills on a dropped socket and
    5 MB payloads.
    """
    broker = MosquittoProcess(mosquitto_binary, tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def fresh_mosquitto(
    tmp_path_factory: pytest.TempPathFactory, mosquitto_binary: Path
) -> Iterator[MosquittoProcess]:
    """A Mosquitto of this test's own, free to ``stop()``, ``kill()``, ``start()``, ``restart()``.

    Same config as ``mosquitto`` (see ``tests.brokers.mosquitto_config``). Findings with
    it (Mosquitto 2.0.11, MQTT 3.1.1, paho clean_session=False):

    - QoS 1 messages queued for an offline persistent session, the session's subscription
      and retained messages survive a graceful ``restart()``: SIGTERM makes Mosquitto write
      its database.
    - They survive ``kill()`` + ``start()`` only if the database was written after they
      arrived: always after ``persist()`` (SIGUSR1, then wait for the write), otherwise
      only once the periodic autosave ran (about every two seconds). A message killed
      within that window is lost, as on a real crash.
    """
    broker = MosquittoProcess(mosquitto_binary, tmp_path_factory.mktemp("fresh-mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def amqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AmqttProcess]:
    """fedge's embedded broker (``python -m runtime.broker``, amqtt) for the whole session.

    Clients must connect with its ``username``/``password`` (anonymous clients are
    refused, and only named sessions keep QoS 1 messages while offline). State lives in
    memory: a restart forgets sessions and retained messages.
    """
    broker = AmqttProcess(tmp_path_factory.mktemp("amqtt"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# --- topics ----------------------------------------------------------------------------


@pytest.fixture
def unique_root(request: pytest.FixtureRequest) -> str:
    """A topic root no other test uses: ``t-<test name>-<8 hex>``, at most 64 characters."""
    suffix = f"-{uuid.uuid4().hex[:_SUFFIX_HEX_CHARS]}"
    room = _MAX_ROOT_CHARS - len(_ROOT_PREFIX) - len(suffix)
    name = _UNSAFE.sub("_", request.node.name).strip("._-")[:room] or "test"
    return f"{_ROOT_PREFIX}{name}{suffix}"


@pytest.fixture
def topics(unique_root: str) -> Topics:
    return Topics(root=unique_root, fleet="test")


# --- logged errors ---------------------------------------------------------------------


class _ErrorRecorder(logging.Handler):
    """Keeps every record at ERROR or above that carries an exception."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is not None and record.exc_info[1] is not None:
            self.records.append(record)


@pytest.fixture(autouse=True)
def logged_errors(request: pytest.FixtureRequest) -> Iterator[list[logging.LogRecord]]:
    """Fail the test if anything logged an exception at ERROR or above (any thread).

    A handler that catches a failure, logs it and carries on would otherwise hide a bug
    from the test. Opt out with ``@pytest.mark.allow_logged_errors``; such a test can
    inspect what was logged through this fixture.
    """
    recorder = _ErrorRecorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    try:
        yield recorder.records
    finally:
        root.removeHandler(recorder)
    if recorder.records and request.node.get_closest_marker(ALLOW_LOGGED_ERRORS) is None:
        details = "\n".join(
            f"{record.name}: {record.getMessage()} ({record.exc_info[1]!r})"
            for record in recorder.records
            if record.exc_info is not None
        )
        pytest.fail(
            f"exceptions were logged during the test (mark it "
            f"@pytest.mark.{ALLOW_LOGGED_ERRORS} if expected):\n{details}",
            pytrace=False,
        )


def _handler_failure_offsets(directory: Path) -> dict[Path, int]:
    return {path: path.stat().st_size for path in directory.glob("*.jsonl")}


@pytest.fixture(autouse=True)
def handler_failures() -> Iterator[None]:
    """Fail the test if any handler exception reached an MQTT link's last-resort handler.

    Unlike ``logged_errors`` this watches child processes too (every ``MqttLink`` writes
    such failures under ``$FEDGE_HANDLER_FAILURES_DIR``), and no marker turns it off: every
    message must be answered by its handler, with an ack or an error event.
    """
    directory = Path(os.environ[HANDLER_FAILURES_ENV])
    before = _handler_failure_offsets(directory)
    yield
    failures = []
    for path, size in _handler_failure_offsets(directory).items():
        if size > before.get(path, 0):
            with path.open("rb") as recorded:
                recorded.seek(before.get(path, 0))
                failures += recorded.read().decode(errors="replace").splitlines()
    if failures:
        shown = []
        for line in failures:
            try:
                failure = json.loads(line)
                shown.append(f"process {failure['pid']}: {failure['what']}\n{failure['traceback']}")
            except (ValueError, KeyError, TypeError):
                shown.append(line)
        pytest.fail(
            f"{len(failures)} handler exception(s) reached the MQTT link's last-resort "
            "handler (every message must be answered by its handler):\n"
            + "\n".join(shown)[-20000:],
            pytrace=False,
        )


_leaks = logging.getLogger("tests.leaks")


@pytest.fixture(autouse=True)
def collect_network_garbage(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a broker or system test, collect its garbage at once and report leaked sockets.

    A socket left open inside a reference cycle is only found by the garbage collector,
    whenever it next runs: its ResourceWarning would then fail some later, unrelated test.
    Collecting here pins the report on the test that made the garbage (as a warning in the
    log, naming the socket) and keeps unrelated tests deterministic.
    """
    yield
    if not any(request.node.get_closest_marker(m) for m in ("broker", "system")):
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    for warning in caught:
        _leaks.warning("%s left %s", request.node.nodeid, warning.message)
