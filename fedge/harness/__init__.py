"""What the test suite and the benchmarks share: a federation of real processes, paho clients.

- ``fedge.harness.federation``: a coordinator and ``fedge agent run`` processes, each with
  its share of the reference non-IID split (:func:`federation`, :class:`Federation`).
- ``fedge.harness.clients``: paho clients that wait explicitly for acknowledgements.
"""
