"""The last resort around every stage: no message can crash or stall it, and a
server that is down is waited for, never blamed on a message.

``Guard`` wraps a processor (the scorer, the learner, the monitor) on every host
(the confluent loop, Faust, the embedded runtime). When ``process(batch)`` raises:

- a server outage (Redis unreachable, timing out, loading or BUSY running a
  script; or ``riverflow.errors.Unavailable``, e.g. the learner's index on a
  full disk): the same batch is run again after a bounded exponential backoff,
  the stage reports itself degraded (``/healthz`` answers 503 with the reason)
  while it lasts, and after ``outage_limit_s`` without success it
  gives up with ``StageOutage`` (the process exits non-zero with one line). Nothing
  goes to the DLQ and nothing is skipped because a server is down.
- anything else (a bug, or a message no validator foresaw): the batch is bisected
  until each message that still raises on its own is alone; that one goes to the
  DLQ as ``internal_error`` with the exception's type and message (its type alone for
  a stage that sees personal data: the message may quote a value), the others are
  processed, and the stage goes on.

Running messages again relies on what the stages already guarantee for replays
(docs/architecture.md): the scorer discards the outputs of an attempt that raised
and its store calls are idempotent by event id (a snapshot stored by the failed
attempt is read back, the prediction is recorded once); the learner keeps what an
attempt that raised did (its outputs come with its next call, labels it read are
skipped, labels it claimed but did not learn are taken over), so each label is
learned and evaluated once; the monitor keeps what an attempt that raised did too
(the records it took in are skipped when given again, its outputs and decisions
come with its next call, a check a record's label led to is run by its next call),
so its quality counts no record twice. Kafka being down is the host's to wait out (it waits
``write_timeout_s`` for acks; librdkafka reconnects by itself) and to report: it
says degraded with source ``kafka``, the guard with its own, and each clears
only its own reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from riverflow.errors import RiverflowError, outage
from riverflow.streams.contracts import Message, Output, Processor

log = logging.getLogger(__name__)

# a batch is retried this long after an outage began, doubling up to the most; a
# retry against a server that is down costs a refused connection, and a short
# cap means the stage resumes within a second of the server's return
FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 1.0


class StageOutage(RiverflowError):
    """A server stayed down longer than the outage limit, or the host failed in a hook
    the guard called before waiting (``on_wait``): the stage stops."""


class Health(Protocol):
    """Where the guard says the stage is degraded (``StageMetrics.set_degraded``)."""

    def set_degraded(self, reason: str | None) -> None: ...


class Guard:
    """A processor that runs ``inner`` and survives it raising (module docstring)."""

    def __init__(
        self,
        inner: Processor,
        dlq: Callable[[Message, str, str], Output],
        outage_limit_s: float = 120.0,
        health: Health | None = None,
        first_backoff_s: float = FIRST_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        withhold_errors: bool = False,
    ) -> None:
        self.inner = inner
        # a stage that sees personal data: an exception's message may quote it (a
        # KeyError names the value), so the DLQ and the log get its type alone
        self.withhold_errors = withhold_errors
        self.stage = inner.stage
        self.dlq = dlq  # the DLQ record of a message, a kind and an error
        self.outage_limit_s = outage_limit_s
        self.health = health
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self.clock = clock
        # called once when an outage begins, before the first wait (the exactly-once
        # host commits its open transaction: the broker would abort it meanwhile)
        self.on_wait: list[Callable[[], None]] = []
        self.internal_errors = 0
        self.degraded: str | None = None
        self.down_since: float | None = None  # (clock) the outage the stage is in began

    def __getattr__(self, name: str) -> Any:
        # what else the host or the runtime reads of the stage (counters, view, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def status(self) -> dict[str, float]:
        return {
            **self.inner.status(),
            "internal_errors": float(self.internal_errors),
            "degraded": float(self.degraded is not None),
        }

    def process(self, batch: Sequence[Message]) -> list[Output]:
        try:
            return self._through_outage(batch)
        except StageOutage:
            raise
        except Exception as exc:  # the last resort: see the module docstring
            return self._bisect(batch, exc)

    def _through_outage(self, batch: Sequence[Message]) -> list[Output]:
        """``inner.process(batch)``, again and again while a server is down."""
        started: float | None = None  # this call's outage (its hooks and its backoff)
        delay = self.first_backoff_s
        while True:
            try:
                out = self.inner.process(batch)
            except Exception as exc:
                why = outage(exc)
                if why is None:
                    raise
                now = self.clock()
                if self.down_since is None:  # an outage the stage was not already in
                    self.down_since = now
                    log.warning("%s degraded, retrying the batch: %s", self.stage, why)
                if started is None:
                    started = now
                    for hook in self.on_wait:
                        try:
                            hook()
                        except Exception as failed:  # the host's failure, not a message's
                            raise StageOutage(f"{self.stage}: {failed}") from failed
                self._set_degraded(why)
                # the limit is the stage's outage's: one that a bisection spans (a call
                # that raised something else meanwhile) is not given the limit again
                down = now - self.down_since
                if down >= self.outage_limit_s:
                    raise StageOutage(
                        f"{self.stage}: a server has been down {down:.0f}s "
                        f"(limit {self.outage_limit_s:g}s, setting outage_limit_s): {why}"
                    ) from exc
                self.sleep(min(delay, max(0.0, self.outage_limit_s - down)))
                delay = min(delay * 2, self.max_backoff_s)
                continue
            if self.down_since is not None:
                # (the outage may have begun in an earlier call: a batch that raised
                # something else while a server was down is bisected, call by call)
                log.warning("%s recovered after %.1fs", self.stage, self.clock() - self.down_since)
                self.down_since = None
                self._set_degraded(None)
            return out

    def _bisect(self, batch: Sequence[Message], exc: Exception) -> list[Output]:
        why = self._describe(exc)
        if not batch:  # a tick: nothing to set aside; the next one tries again
            log.error("%s: a tick raised %s", self.stage, why)
            self.internal_errors += 1
            return []
        if len(batch) == 1:
            msg = batch[0]
            self.internal_errors += 1
            log.error(
                "%s: %s[%s]@%s raised %s", self.stage, msg.topic, msg.partition, msg.offset, why
            )
            return [self.dlq(msg, "internal_error", why)]
        mid = len(batch) // 2
        return self.process(batch[:mid]) + self.process(batch[mid:])

    def _describe(self, exc: Exception) -> str:
        if self.withhold_errors:
            return f"{type(exc).__name__} (its message withheld: the stage sees personal data)"
        return f"{type(exc).__name__}: {exc}"

    def _set_degraded(self, reason: str | None) -> None:
        self.degraded = reason
        if self.health is not None:
            self.health.set_degraded(reason)
