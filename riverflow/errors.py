"""The root of riverflow's own exceptions; each package derives its own from it."""

from __future__ import annotations

from pydantic import ValidationError


class RiverflowError(Exception):
    """Base class of every error riverflow raises on purpose."""


class Unavailable(RiverflowError):
    """Something a stage needs is down or cannot take writes (not a bad message): the
    guard (``streams.guard``) retries the batch with backoff, says the stage is
    degraded, and stops it after the outage limit."""


def error_lines(exc: ValidationError) -> list[str]:
    """One ``field.path: what is wrong`` line per error of a pydantic validation."""
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return lines
