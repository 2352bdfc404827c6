"""``fedge camera``: publish frames from a camera, a video, an image folder or one image.

Stages, kept apart so ``fedge demo`` and the tests can drive each one:

- :func:`open_source` turns SOURCE into an iterator of :class:`SourceFrame`
  ``(image, label, name)``. Image files come out as their original bytes (never
  re-encoded) unless a resize is asked for; device and video frames come out as BGR
  ndarrays. Everything that can be checked before the first frame (missing path, empty
  folder, unopenable device, bad folder label) is checked at once, as a :class:`ConfigError`.
- :func:`publish_frames` paces frames at N fps on a monotonic clock, JPEG-encodes
  ndarrays, wraps them in the binary frame envelope if asked, and publishes them through
  an :class:`MqttLink`, keeping at most ``MAX_PENDING_FRAMES`` unconfirmed so a slow
  broker slows the camera down instead of filling memory.
- :data:`camera_command` is the click command; the ``fedge`` group registers it.

Delivery: QoS 0 (the default) is what a live camera wants: a frame produced while the
broker is unreachable is dropped, not queued. With QoS 1 nothing is dropped: frames wait
in the MQTT client until the broker acknowledges them.
"""

from fedge.camera.command import camera_command
from fedge.camera.publishing import CameraReport, PublishSettings, publish_frames
from fedge.camera.sources import (
    DEFAULT_BROKER_URL,
    DEFAULT_CAMERA_ID,
    DEFAULT_FPS,
    DEFAULT_JPEG_QUALITY,
    IMAGE_SUFFIXES,
    SourceFrame,
    open_source,
)

__all__ = [
    "DEFAULT_BROKER_URL",
    "DEFAULT_CAMERA_ID",
    "DEFAULT_FPS",
    "DEFAULT_JPEG_QUALITY",
    "IMAGE_SUFFIXES",
    "CameraReport",
    "PublishSettings",
    "SourceFrame",
    "camera_command",
    "open_source",
    "publish_frames",
]
