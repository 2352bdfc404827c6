"""The ``fedge`` command families, one module each; ``fedge.cli`` gathers them."""
