"""The root of riverflow's own exceptions; each package derives its own from it."""


class RiverflowError(Exception):
    """Base class of every error riverflow raises on purpose."""
