"""What processes cost in memory, without counting shared pages once per process.

Resident memory (RSS) counts every shared library page in full in every process that maps
it, so N agent processes sharing Python, NumPy and LiteRT look N times as big as they are.
PSS divides each shared page among the processes sharing it (summed over processes it is
what they really take); USS is what one process alone holds (freed when it exits). Both
come from the kernel's ``/proc/<pid>/smaps_rollup``, the figures ``smem`` prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["MB", "Memory", "available_bytes", "memory_of", "total_memory"]

MB = 2**20


class Memory(dict[str, int]):
    """``rss``, ``pss``, ``uss`` and ``peak_rss`` in bytes (a dict, so it goes into JSON)."""


def memory_of(pid: int) -> Memory:
    """One process's memory now; zeros for a process that is gone."""
    fields: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[-1] == "kB":
                fields[name] = int(parts[0]) * 1024
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return Memory(rss=0, pss=0, uss=0, peak_rss=0)
    peak = next(
        (int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")),
        0,
    )
    return Memory(
        rss=fields.get("Rss", 0),
        pss=fields.get("Pss", 0),
        uss=fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        peak_rss=peak,
    )


def total_memory(pids: Iterable[int]) -> Memory:
    """Summed over processes: PSS and USS add up; RSS overstates (shared pages repeat)."""
    total = Memory(rss=0, pss=0, uss=0, peak_rss=0)
    for pid in pids:
        for key, value in memory_of(pid).items():
            total[key] += value
    return total


def available_bytes() -> int:
    """The kernel's estimate of memory available to new work (``MemAvailable``)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")
