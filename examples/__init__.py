"""Ready pipeline specs (``fraud.yaml``, ``fraud-bench.yaml``), installed as package data
of ``riverflow.examples`` so an installed riverflow finds them from any directory."""
