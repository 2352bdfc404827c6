"""``fedge demo``: a whole fleet on one machine, in about a minute.

An embedded broker (or ``--broker``), a coordinator, N agents as separate processes (each
with its own non-IID share of the digits as labelled samples), and a camera streaming
unlabelled digits. Agents serve live inference with whatever model the fleet has, while
federated rounds improve it; mid-demo one agent is cut off and comes back, and the rounds
go on. It ends with a summary table, a plot of accuracy per round (PNG) and a JSON report.
"""

from fedge.demo.run import run_demo
from fedge.demo.settings import DemoSettings

__all__ = ["DemoSettings", "run_demo"]
