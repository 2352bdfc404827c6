"""The suite's own fixtures: unique topic roots, and logged errors that fail a test."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from protocol.topics import Topics, validate_id

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBPROCESS_TIMEOUT_S = 120.0


def test_unique_root_names_the_test(unique_root: str, topics: Topics) -> None:
    assert re.fullmatch(r"t-test_unique_root_names_the_test-[0-9a-f]{8}", unique_root)
    assert topics.root == unique_root
    assert topics.fleet == "test"


@pytest.mark.parametrize("label", ["x" * 100 + "[weird/param#+]"])
def test_unique_root_stays_short_and_safe(unique_root: str, label: str) -> None:
    assert len(unique_root) <= 64
    assert validate_id(unique_root) == unique_root
    assert Topics(root=unique_root, fleet="test").agent_status("a").startswith(unique_root + "/")


@pytest.mark.allow_logged_errors
def test_logged_errors_are_recorded_from_any_thread(logged_errors: list[logging.LogRecord]) -> None:
    def fail_and_log() -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("tests.harness").exception("handler failed")

    worker = threading.Thread(target=fail_and_log)
    worker.start()
    worker.join()
    assert [record.getMessage() for record in logged_errors] == ["handler failed"]


def _run_inner_pytest(tmp_path: Path, inner: Path) -> subprocess.CompletedProcess[str]:
    """Run one test file under this suite's conftest only, as a separate pytest."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            "/dev/null",
            str(inner),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def test_a_logged_exception_fails_an_unmarked_test(tmp_path: Path) -> None:
    inner = tmp_path / "test_inner.py"
    inner.write_text(
        textwrap.dedent(
            """
            import logging

            import pytest

            def test_hides_a_failure():
                try:
                    1 / 0
                except ZeroDivisionError:
                    logging.getLogger("inner").exception("swallowed")

            @pytest.mark.allow_logged_errors
            def test_expects_it():
                try:
                    1 / 0
                except ZeroDivisionError:
                    logging.getLogger("inner").exception("expected")

            def test_logs_without_traceback():
                logging.getLogger("inner").error("plain error, no exception")
            """
        ),
        encoding="utf-8",
    )
    result = _run_inner_pytest(tmp_path, inner)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 passed, 1 error" in result.stdout, result.stdout
    assert "ERROR at teardown of test_hides_a_failure" in result.stdout
    assert "exceptions were logged during the test" in result.stdout
    assert "swallowed" in result.stdout


def test_a_handler_failure_fails_the_test_even_in_a_child_process(tmp_path: Path) -> None:
    """The ``handler_failures`` guard: no marker silences it, and it sees child processes."""
    inner = tmp_path / "test_inner_handlers.py"
    inner.write_text(
        textwrap.dedent(
            """
            import subprocess
            import sys
            import threading

            import pytest

            from runtime.mqtt import MqttLink, parse_broker_url

            CHILD = '''
            import sys, threading
            from runtime.mqtt import MqttLink, parse_broker_url
            called = threading.Event()
            def handler(topic, payload):
                called.set()
                raise ValueError("child handler bug")
            link = MqttLink(parse_broker_url(sys.argv[1]), client_id="inner-child",
                            on_message=handler, clean_session=True)
            link.subscribe("inner/child", qos=1)
            link.start()
            link.wait_connected(30)
            link.publish("inner/child", b"x", qos=1)
            assert called.wait(30)
            link.stop()
            '''

            def _link(url, handler, client_id):
                link = MqttLink(parse_broker_url(url), client_id=client_id,
                                on_message=handler, clean_session=True)
                link.subscribe(f"inner/{client_id}", qos=1)
                link.start()
                link.wait_connected(30)
                return link

            @pytest.mark.allow_logged_errors
            def test_in_process(mosquitto):
                called = threading.Event()
                def handler(topic, payload):
                    called.set()
                    raise ValueError("in-process handler bug")
                link = _link(mosquitto.url, handler, "inner-here")
                link.publish("inner/inner-here", b"x", qos=1)
                assert called.wait(30)
                link.stop()

            def test_in_a_child(mosquitto):
                subprocess.run([sys.executable, "-c", CHILD, mosquitto.url], check=True,
                               timeout=60)

            def test_answered(mosquitto):
                called = threading.Event()
                link = _link(mosquitto.url, lambda topic, payload: called.set(), "inner-ok")
                link.publish("inner/inner-ok", b"x", qos=1)
                assert called.wait(30)
                link.stop()
            """
        ),
        encoding="utf-8",
    )
    result = _run_inner_pytest(tmp_path, inner)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 passed, 2 errors" in result.stdout, result.stdout
    assert "ERROR at teardown of test_in_process" in result.stdout
    assert "ERROR at teardown of test_in_a_child" in result.stdout
    assert "in-process handler bug" in result.stdout
    assert "child handler bug" in result.stdout
