"""What the test suite and the benchmarks share: a federation of real processes, paho clients.

- ``fedge.harness.federation``: a coordinator and ``fedge agent run`` processes, each with
  its share of the reference non-IID split (:func:`federation`, :class:`Federation`).
- ``fedge.harness.clients``: paho clients that wait explicitly for acknowledgements.
- ``fedge.harness.faults``, ``fedge.harness.links``, ``fedge.harness.netns``: a TCP proxy that
  cuts, holds or shapes links (latency, jitter, bandwidth, stalls, loss bursts), and
  bandwidth below TCP through ``tbf`` in a network namespace of its own (as root).
"""
