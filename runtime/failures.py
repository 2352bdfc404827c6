"""Handler failures that reached an MQTT link's last-resort handler, recorded for watchers.

Every message handler is meant to answer (an ack or an error event); an exception that
gets as far as :func:`runtime.mqtt.MqttLink`'s last-resort handler is a bug. With
``FEDGE_HANDLER_FAILURES_DIR`` set, each one is also written to that directory, one JSON
line per failure in ``<pid>.jsonl``: the test suite fails any test during which one was
written, in its own process or in any process it started; a soak run can watch it too.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path

__all__ = ["HANDLER_FAILURES_ENV", "record_handler_failure"]

logger = logging.getLogger(__name__)

HANDLER_FAILURES_ENV = "FEDGE_HANDLER_FAILURES_DIR"
MAX_TRACEBACK_CHARS = 8192


def record_handler_failure(what: str, exc: BaseException) -> None:
    directory = os.environ.get(HANDLER_FAILURES_ENV)
    if not directory:
        return
    line = json.dumps(
        {
            "time": time.time(),
            "pid": os.getpid(),
            "what": what[:512],
            "error": repr(exc)[:2048],
            "traceback": "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:],
        }
    )
    try:
        with (Path(directory) / f"{os.getpid()}.jsonl").open("a", encoding="utf-8") as out:
            out.write(line + "\n")
    except OSError:
        logger.warning("cannot record the handler failure in %s", directory)
