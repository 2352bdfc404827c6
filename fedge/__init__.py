"""fedge: the command line and the I/O shared by the agent and the coordinator."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
