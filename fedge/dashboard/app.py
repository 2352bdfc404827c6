"""The dashboard's web face: a page, its state as JSON, live updates, and round actions.

Routes: ``/`` (the page), ``/static/...`` (its script, styles and vendored uPlot),
``/api/state`` (a snapshot), ``/api/events`` (server-sent events, one snapshot per change),
``/api/config`` (whether this client may act), ``POST /api/rounds/start`` and
``POST /api/rounds/stop``. Actions go through :func:`fedge.control.remote.send_command`, the path
of ``fedge round start`` and ``fedge round stop``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fedge.control.remote import send_command
from fedge.dashboard.state import FleetView
from protocol.errors import FedgeError
from protocol.messages.base import Message
from protocol.messages.commands import StartRounds, StopRounds
from protocol.signing import SigningKey
from runtime.mqtt import BrokerAddress

__all__ = ["Actions", "build_app"]

STATIC_DIR = Path(__file__).parent / "static"
# Snapshots are pushed at most this often: a camera at 30 fps must not mean 30 pushes a second.
PUSH_INTERVAL_S = 0.25
SSE_PING_S = 15
MAX_BODY_BYTES = 16_384
_START_FIELDS = {"rounds", "min_agents", "fraction", "deadline_s", "strategy", "options"}


@dataclass(frozen=True)
class Actions:
    """Who may start and stop rounds: nobody (read only), token holders, or local clients."""

    broker: BrokerAddress
    token: str | None = None
    read_only: bool = False
    operator_key: SigningKey | None = None  # signs its commands where operators must sign


def build_app(view: FleetView, actions: Actions) -> Starlette:
    async def page(_request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    async def state(_request: Request) -> Response:
        return JSONResponse(view.snapshot())

    async def config(request: Request) -> Response:
        refusal = _refusal(request, actions, check_token=False)
        return JSONResponse(
            {
                "actions": refusal is None,
                "needs_token": actions.token is not None and not actions.read_only,
                "why_not": refusal[1] if refusal else None,
            }
        )

    async def events(_request: Request) -> Response:
        async def snapshots() -> AsyncIterator[dict[str, str]]:
            seen = -1
            while True:
                if view.version != seen:
                    seen = view.version
                    yield {"event": "state", "data": json.dumps(view.snapshot())}
                await anyio.sleep(PUSH_INTERVAL_S)

        return EventSourceResponse(snapshots(), ping=SSE_PING_S)

    async def start(request: Request) -> Response:
        return await _act(request, actions, view, start=True)

    async def stop(request: Request) -> Response:
        return await _act(request, actions, view, start=False)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/state", state),
            Route("/api/config", config),
            Route("/api/events", events),
            Route("/api/rounds/start", start, methods=["POST"]),
            Route("/api/rounds/stop", stop, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
    )


def _refusal(request: Request, actions: Actions, *, check_token: bool) -> tuple[int, str] | None:
    """Why this request may not act, as (HTTP status, reason); ``None`` if it may."""
    if actions.read_only:
        return 403, "read_only"
    origin = request.headers.get("origin")
    # A page on another site may POST here from the user's browser: refuse foreign origins.
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        return 403, "cross_origin"
    if actions.token is not None:
        if not check_token:
            return None
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), actions.token.encode()):
            return 401, "bad_token"
        return None
    host = request.client.host if request.client else ""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    return None if local else (403, "not_localhost")


async def _act(request: Request, actions: Actions, view: FleetView, *, start: bool) -> Response:
    refusal = _refusal(request, actions, check_token=True)
    if refusal is not None:
        return _error(refusal[0], refusal[1], "this dashboard does not take actions from you")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        # Also a CSRF guard: a cross-site JSON POST needs a CORS preflight, never granted.
        return _error(415, "bad_content_type", "send the request as application/json")
    command = _command(await request.body(), start=start)
    if isinstance(command, JSONResponse):
        return command
    topics = view.topics
    try:
        ack = await run_in_threadpool(
            send_command,
            actions.broker,
            command_topic=topics.coordinator_commands(),
            events_topic=topics.coordinator_events(),
            command=command,
            operator_key=actions.operator_key,
        )
    except FedgeError as exc:
        return _error(504, exc.reason, str(exc))
    answer = ack.model_dump(mode="json", include={"ok", "reason", "message", "detail"})
    return JSONResponse(answer, status_code=200 if ack.ok else 409)


def _command(body: bytes, *, start: bool) -> Message | JSONResponse:
    """The command a request asks for, or the error response saying why it is refused."""
    if len(body) > MAX_BODY_BYTES:
        return _error(413, "too_large", "request body is too large")
    try:
        fields: Any = json.loads(body or b"{}")
        if not isinstance(fields, dict):
            return _error(400, "invalid", "the request body must be a JSON object")
        if not start:
            return StopRounds(command_id=_command_id(), reason="dashboard")
        chosen = {k: v for k, v in fields.items() if k in _START_FIELDS}
        return StartRounds.model_validate({**chosen, "command_id": _command_id()})
    except (ValueError, ValidationError) as exc:
        return _error(400, "invalid", str(exc)[:500])


def _error(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "reason": reason, "message": message}, status_code=status)


def _command_id() -> str:
    return f"dashboard-{uuid.uuid4().hex[:12]}"
