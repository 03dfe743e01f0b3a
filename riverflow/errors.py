"""The root of riverflow's own exceptions (each package derives its own from it), and
which exceptions are a server being down (``outage``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

# answers of a Redis server that is there but cannot serve now (or, like a changed
# password or a full memory, not until someone acts: better to stop after the outage
# limit than to send every message to the DLQ). redis-py raises its own class for
# most, with the code cut off the message ("CLUSTERDOWN The cluster is down" is a
# ClusterDownError saying "The cluster is down"): those are matched by class
# (``_redis_outages``), the rest by the code the message starts with
# the answers that refuse the stage's user (a password, an ACL): outages to a running
# stage's guard, an error at once at startup (``refusal``)
_REDIS_REFUSED = ("NOAUTH", "WRONGPASS", "NOPERM")
_REDIS_BUSY = (
    "BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "OOM",
    "MISCONF", *_REDIS_REFUSED,
)  # fmt: skip


def _redis_outages(rx: Any) -> tuple[type[BaseException], ...]:
    """redis-py's exceptions that are a server (or a cluster) unable to serve now."""
    return (
        rx.ConnectionError,  # refused, reset, authentication, too many connections
        rx.TimeoutError,
        rx.BusyLoadingError,
        rx.ClusterDownError,  # and MasterDownError: a primary failed, no replica took over yet
        rx.TryAgainError,  # a slot migrating or failing over
        rx.ReadOnlyError,  # a write to a primary just demoted to a replica
        rx.OutOfMemoryError,  # maxmemory reached
        rx.NoPermissionError,  # an ACL changed under the stage
        rx.SlotNotCoveredError,  # the client's view of the cluster: no node for a slot
        rx.RedisClusterUnreachableError,  # no node of the cluster answers
    )


class RiverflowError(Exception):
    """Base class of every error riverflow raises on purpose."""


class Unavailable(RiverflowError):
    """Something a stage needs is down or cannot take writes (not a bad message): the
    guard (``streams.guard``) retries the batch with backoff, says the stage is
    degraded, and stops it after the outage limit."""


def outage(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it was raised from) is a server being down, or
    None if it is not one."""
    return _in_chain(exc, _outage_of)


def refusal(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it was raised from) is Redis refusing the stage's
    user: a wrong password, a disabled user, a command its ACL does not allow; None if
    it is not one. To a running stage's guard it is an outage (an ACL changed under it
    must not send every message to the DLQ); at startup, an error at once."""
    return _in_chain(exc, _refusal_of)


def _in_chain(exc: BaseException, why_of: Callable[[BaseException], str | None]) -> str | None:
    """``why_of`` the first of ``exc`` and the exceptions it was raised from that has one."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        why = why_of(e)
        if why is not None:
            return why
        e = e.__cause__ or e.__context__
    return None


def _refusal_of(e: BaseException) -> str | None:
    try:
        import redis.exceptions as rx
    except ImportError:  # pragma: no cover - redis is a dependency
        return None
    coded = isinstance(e, rx.ResponseError) and str(e).startswith(_REDIS_REFUSED)
    if isinstance(e, rx.AuthenticationError | rx.NoPermissionError) or coded:
        return f"Redis refused: {str(e)[:200]}"
    return None


def _outage_of(e: BaseException) -> str | None:
    name = f"{type(e).__module__}.{type(e).__name__}"
    try:
        import redis.exceptions as rx
    except ImportError:  # pragma: no cover - redis is a dependency
        rx = None  # type: ignore[assignment]
    if rx is not None:
        if isinstance(e, _redis_outages(rx)):
            return f"Redis: {name}: {e}"
        if isinstance(e, rx.ResponseError | rx.AuthenticationError) and str(e).startswith(
            _REDIS_BUSY
        ):
            return f"Redis: {str(e)[:200]}"
    if isinstance(e, ConnectionError | TimeoutError):  # the builtins (OSError)
        return f"{name}: {e}"
    if isinstance(e, Unavailable):
        return str(e)[:300]
    return None


def error_lines(exc: ValidationError) -> list[str]:
    """One ``field.path: what is wrong`` line per error of a pydantic validation."""
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return lines
