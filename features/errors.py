"""Errors of the feature store."""

from riverflow.errors import RiverflowError


class FeatureStoreError(RiverflowError):
    """The feature store could not be reached or answered something unexpected."""
