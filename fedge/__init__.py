"""fedge's commands and tools: the ``fedge`` CLI, camera, demo, deploy, docs, dashboard.

The top layer: it imports the daemons (``agent``, ``coordinator``) and the shared
``runtime``; nothing imports it.
"""

from runtime import __version__

__all__ = ["__version__"]
