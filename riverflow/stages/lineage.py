"""The learner's line of versions: its candidates in the registry.

Publishing each candidate as a new version, moving the champion pointer along
while it follows the learner, following the fresh challengers and rollbacks the
monitor writes to the registry, and the checkpoint the learner restarts from.
The learner stage (``riverflow.stages.learner``) trains the candidates held here
and says when to publish; every read and write of the registry is here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.models.errors import ModelError, ModelSpecError
from riverflow.models.registry import ChampionPointer, ModelRegistry, PointerMove
from riverflow.monitors.prequential import Metrics, PrequentialMetrics, metrics_from_state
from riverflow.streams.contracts import Label, Message, ModelEvent, Output
from riverflow.streams.topics import Topics


@dataclass
class Candidate:
    """One candidate as the learner holds it: its live model and its prequential metrics."""

    name: str
    model: Any
    version: int  # the last published version this model descends from (0: fresh)
    metrics: Metrics


@dataclass(frozen=True)
class Following:
    """How the lineage follows the monitor's decisions in the registry."""

    fresh_model: Callable[[str], Any | None]  # spec candidate -> a fresh model (None: no such)
    poll_s: float  # the registry is read at most this often (and before every publish)
    # a fresh challenger's metrics (of the label's kind)
    new_metrics: Callable[[], Metrics] = PrequentialMetrics


class Lineage:
    """The candidates' published versions and the champion pointer's moves for them.

    The pointer advances to a candidate's new version only while it points at
    that candidate's previous one (or, before any version exists, if it is the
    lead), and across a crash of the learner (see ``_orphan_of``): a promotion
    or rollback made meanwhile is never overwritten.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        topics: Topics,
        candidates: Sequence[Candidate],
        lead: str,
        following: Following,
    ) -> None:
        self.registry = registry
        self.topics = topics
        self.candidates = {c.name: c for c in candidates}
        self.lead = lead
        self.following = following
        self.dynamic: dict[str, str] = {}  # fresh challengers the monitor started -> base
        self._staged: LearnerCheckpoint | None = None
        self._rollbacks_after = 0.0  # unix seconds: rollbacks after this are not applied yet
        self._next_poll = 0.0

    def follow(self, now: float, force: bool = False) -> list[Output]:
        """Train the fresh challengers the monitor started, drop the retired ones, and
        continue a rolled-back candidate from the version it was rolled back to.

        Reads the registry at most every ``following.poll_s``; returns model-events.
        """
        if now < self._next_poll and not force:
            return []
        self._next_poll = now + self.following.poll_s
        out = []
        wanted = {name: info["base"] for name, info in self.registry.challengers().items()}
        pointer = self.registry.champion()
        for name in [n for n in self.dynamic if n not in wanted]:
            if pointer is not None and pointer.model == name:
                continue  # retired while champion: keep training what is served
            del self.candidates[name], self.dynamic[name]
            out.append(self._model_event(ModelEvent(kind="dropped", model=name,
                                                    version=0, reason="retired")))  # fmt: skip
        for name, base in wanted.items():
            if name in self.candidates:
                continue
            model = self.following.fresh_model(base)
            if model is None:
                raise ModelSpecError(f"fresh challenger of {base!r}: not a candidate of the spec")
            self.candidates[name] = Candidate(name, model, 0, self.following.new_metrics())
            self.dynamic[name] = base
            out.append(self._model_event(ModelEvent(kind="started", model=name, version=0,
                                                    reason=f"fresh {base}")))  # fmt: skip
        out += self._follow_rollback(pointer)
        return out

    def _follow_rollback(self, pointer: ChampionPointer | None) -> list[Output]:
        """Continue a rolled-back candidate from the version it was rolled back to.

        Looks at the last moves, not only the last one: a snapshot published just
        after a rollback to the version it continued may have advanced the
        pointer again; that advance is rolled back too.
        """
        moves = self.registry.recent_moves(10)
        new = [m for m in moves if m.at > self._rollbacks_after]
        self._rollbacks_after = max([self._rollbacks_after, *(m.at for m in moves)])
        back = next((m for m in reversed(new) if m.kind == "rollback"), None)
        if back is None or back.to.model not in self.candidates:
            return []
        c, to = self.candidates[back.to.model], back.to
        c.model, c.version = self.registry.load(to.model, to.version).model, to.version
        out = [self._model_event(ModelEvent(kind="rebased", model=c.name, version=c.version,
                                            reason=back.reason))]  # fmt: skip
        if pointer is not None and pointer.model == to.model and pointer.version > to.version:
            again = self.registry.move(to, "rollback", pointer, f"re-applied: {back.reason}")
            if again is not None:
                self._rollbacks_after = again.at
                out.append(self._model_event(again.as_event()))
        return out

    def publish(
        self,
        now: float,
        labels_seen: int,
        positions: Mapping[int, int],
        pending: Sequence[tuple[Message, Label]],
        searches: Mapping[str, dict[str, Any]] | None = None,
        timeouts: Mapping[int, int] | None = None,
    ) -> list[Output]:
        """Publish every candidate as a new version and stage the checkpoint of what the
        learner has done (``labels_seen``, its read ``positions``, the labels still
        ``pending``, where its ``searches`` and its labels by ``timeouts`` are);
        returns the model-events to write."""
        out: list[Output] = self.follow(now, force=True)
        offsets = {self.topics.labels: {str(p): o for p, o in sorted(positions.items())}}
        for c in self.candidates.values():
            meta = {
                "model": c.name,
                "parent": c.version,
                "labels_seen": labels_seen,
                "offsets": offsets,
                "metrics": c.metrics.as_dict(),
            }
            parent, c.version = c.version, self.registry.publish(c.name, c.model, meta)
            out.append(self._model_event(ModelEvent(kind="published", model=c.name,
                                                    version=c.version, parent=parent,
                                                    labels_seen=labels_seen)))  # fmt: skip
            if parent or c.name == self.lead:
                moved = self._advance(c.name, parent, c.version)
                if moved is not None:
                    out.append(self._model_event(moved.as_event()))
        self._staged = LearnerCheckpoint(
            versions={c.name: c.version for c in self.candidates.values()},
            metrics={c.name: c.metrics.state() for c in self.candidates.values()},
            labels_seen=labels_seen,
            positions=dict(positions),
            pending=list(pending),
            saved_at=self.registry.clock(),
            searches=dict(searches or {}),
            timeouts=dict(timeouts or {}),
        )
        return out

    def _advance(self, name: str, parent: int, version: int) -> PointerMove | None:
        """Move the pointer from ``name``'s ``parent`` version to ``version``, if it still
        follows the learner; the move made, or None."""
        expect = ChampionPointer(name, parent) if parent else None
        to = ChampionPointer(name, version)
        moved = self.registry.move(to, "advance", expect)
        current = self.registry.champion()
        if moved is None and current and self._orphan_of(current, name, parent):
            moved = self.registry.move(to, "advance", current)
        return moved

    def _orphan_of(self, pointer: ChampionPointer, name: str, parent: int) -> bool:
        """Whether ``pointer`` is a version of ``name`` that a dead run of this learner
        published after ``parent`` without committing it: it still follows the learner."""
        if pointer.model != name or not parent or pointer.version <= parent:
            return False
        version = pointer.version
        while version > parent:
            try:
                version = int(self.registry.meta(pointer.model, version).get("parent", 0))
            except ModelError:  # pruned: not a line of versions the pointer followed
                return False
        return version == parent

    def commit(self) -> bool:
        """Save the checkpoint staged by the last ``publish``; whether there was one."""
        if self._staged is None:
            return False
        self.registry.save_checkpoint(self._staged)
        self._staged = None
        return True

    def restore(self, saved: LearnerCheckpoint) -> None:
        """Continue each candidate from its version in ``saved`` (a candidate new since
        starts fresh), and the fresh challengers the monitor still wants.

        A rollback made after ``saved`` is applied at the next ``follow``.
        """
        for c in self.candidates.values():
            version = saved.versions.get(c.name, 0)
            if version:
                c.model, c.version = self.registry.load(c.name, version).model, version
                c.metrics = metrics_from_state(saved.metrics[c.name])
        for name, info in self.registry.challengers().items():
            if name not in saved.versions or name in self.candidates:
                continue
            fresh = self.following.fresh_model(info["base"])
            if fresh is None:  # its base left the spec
                continue
            v = saved.versions[name]
            model = self.registry.load(name, v).model if v else fresh
            metrics = metrics_from_state(saved.metrics[name])
            self.candidates[name] = Candidate(name, model, v, metrics)
            self.dynamic[name] = info["base"]
        self._rollbacks_after = saved.saved_at

    def _model_event(self, event: ModelEvent) -> Output:
        return Output(self.topics.model_events, event.model.encode(), event.encode())
