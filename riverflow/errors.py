"""The root of riverflow's own exceptions; each package derives its own from it."""

from __future__ import annotations

from pydantic import ValidationError


class RiverflowError(Exception):
    """Base class of every error riverflow raises on purpose."""


def error_lines(exc: ValidationError) -> list[str]:
    """One ``field.path: what is wrong`` line per error of a pydantic validation."""
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return lines
