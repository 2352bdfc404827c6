"""The fleet dashboard: a live web page built from what the fleet publishes on MQTT.

``state`` keeps the picture (pure, bounded, thread-safe), ``app`` serves it (Starlette,
server-sent events, round actions through the coordinator's command topic) and ``command``
is ``fedge dashboard``.
"""
