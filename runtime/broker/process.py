"""The embedded broker as the main thread of a process: until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

from runtime.broker.embedded import (
    DEFAULT_BROKER_HOST,
    DEFAULT_BROKER_PASSWORD,
    DEFAULT_BROKER_PORT,
    DEFAULT_BROKER_USERNAME,
    BrokerSettings,
    quiet_amqtt_logging,
    serve,
)

__all__ = ["run_embedded_broker"]


async def _serve_until_signal(settings: BrokerSettings, ready: threading.Event | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if received:  # a second Ctrl-C: no clean shutdown wanted, leave now
            os._exit(128 + signal.SIGINT)
        received.append(signum)
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await serve(settings, stop, ready.set if ready is not None else lambda: None)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    return received[0] if received else 0


def run_embedded_broker(
    host: str = DEFAULT_BROKER_HOST,
    port: int = DEFAULT_BROKER_PORT,
    *,
    username: str = DEFAULT_BROKER_USERNAME,
    password: str = DEFAULT_BROKER_PASSWORD,
    ready: threading.Event | None = None,
) -> int:
    """Serve in the calling (main) thread until SIGTERM or SIGINT, then shut down cleanly.

    Returns the signal that stopped it; a second signal exits the process at once.
    ``ready`` is set once the port accepts connections. Raises :class:`TransportError`
    if the broker cannot listen (port taken, address not local).
    """
    settings = BrokerSettings(host, port, username, password)
    quiet_amqtt_logging()
    return asyncio.run(_serve_until_signal(settings, ready))
