"""``python -m runtime.broker``: fedge's embedded MQTT 3.1.1 broker as a process of its own."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from protocol.errors import ConfigError, TransportError
from runtime.broker.embedded import (
    DEFAULT_BROKER_HOST,
    DEFAULT_BROKER_PASSWORD,
    DEFAULT_BROKER_PORT,
    DEFAULT_BROKER_USERNAME,
    NOISY_LOGGERS,
    PASSWORD_ENV_VAR,
)
from runtime.broker.process import run_embedded_broker

__all__ = ["main"]

logger = logging.getLogger("runtime.broker")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.broker",
        description="Run fedge's embedded MQTT 3.1.1 broker (amqtt) until SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default=DEFAULT_BROKER_HOST, help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_BROKER_PORT, help="TCP port")
    parser.add_argument("--username", default=DEFAULT_BROKER_USERNAME)
    parser.add_argument(
        "--password",
        default=os.environ.get(PASSWORD_ENV_VAR, DEFAULT_BROKER_PASSWORD),
        help=f"default: ${PASSWORD_ENV_VAR}, else {DEFAULT_BROKER_PASSWORD!r}",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of fedge's own messages (amqtt stays at WARNING unless DEBUG)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m runtime.broker``; returns the process exit status."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level == "DEBUG":
        # An explicit level: run_embedded_broker() only quietens loggers left at NOTSET.
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        stopped_by = run_embedded_broker(
            args.host, args.port, username=args.username, password=args.password
        )
    except (TransportError, ConfigError) as exc:
        logger.error("%s", exc)  # noqa: TRY400 - the message says it all; no traceback
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the loop's handlers were in place
        return 128 + signal.SIGINT
    return 128 + signal.SIGINT if stopped_by == signal.SIGINT else 0


if __name__ == "__main__":
    sys.exit(main())
