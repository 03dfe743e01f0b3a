"""Errors of model building, signing and the registry."""

from riverflow.errors import RiverflowError


class ModelError(RiverflowError):
    """A model could not be built, loaded or verified."""


class ModelSpecError(ModelError):
    """The spec names an estimator that does not exist or cannot take its parameters."""


class SignatureError(ModelError):
    """A snapshot blob is unsigned or was not signed with our key: refused unread."""


class CheckpointError(ModelError):
    """A stored learner checkpoint is not a document this version reads: refused."""
