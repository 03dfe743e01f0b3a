"""Errors of the monitors package."""

from riverflow.errors import RiverflowError


class MonitorError(RiverflowError):
    """Base of the monitors package's errors."""


class ViewError(MonitorError):
    """A monitor view document (``/status.json``, a saved state) that is not valid."""
