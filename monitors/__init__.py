"""Monitors: model quality (prequential metrics), later drift detection, promotion
and rollback policy, Prometheus exporters and the status page."""
