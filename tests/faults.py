"""Network faults for tests: the fault proxy and the link simulators of ``fedge.harness``.

They live in the installed package so that ``bench/links.py`` uses them too.
"""

from __future__ import annotations

from fedge.harness.faults import TcpProxy
from fedge.harness.links import CLEAN, PROFILES, LinkProfile, Schedule
from fedge.harness.netns import ShapedNamespace, namespaces_available

__all__ = [
    "CLEAN",
    "PROFILES",
    "LinkProfile",
    "Schedule",
    "ShapedNamespace",
    "TcpProxy",
    "namespaces_available",
]
