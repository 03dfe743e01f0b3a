"""The learner's line of versions: its candidates in the registry.

Publishing each candidate as a new version, moving the champion pointer along
while it follows the learner, following the fresh challengers and rollbacks the
monitor writes to the registry, and the checkpoint the learner restarts from.
The learner stage (``riverflow.stages.learner``) trains the candidates held here
and says when to publish; every read and write of the registry is here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.models.errors import ModelError, ModelSpecError
from riverflow.models.factory import reconcile
from riverflow.models.registry import ChampionPointer, ModelRegistry, PointerMove, UnsureMoves
from riverflow.monitors.prequential import Metrics, PrequentialMetrics, metrics_from_state
from riverflow.streams.contracts import Label, Message, ModelEvent, Output
from riverflow.streams.topics import Topics

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class _Rollback:
    """What ``Lineage.follow`` read of the rollbacks: the moves seen up to ``seen``;
    the rollback to follow (with the model of the version it went back to) and the
    move that re-applied it, if any."""

    seen: float
    move: PointerMove | None = None
    model: Any = None
    again: PointerMove | None = None


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
        size_warn_bytes: int = 0,
    ) -> None:
        self.registry = registry
        self.size_warn_bytes = size_warn_bytes  # a version's size that is warned of (0: none)
        self._warned_bytes: dict[str, int] = {}  # candidate -> the size last warned of
        self.topics = topics
        self.candidates = {c.name: c for c in candidates}
        self.lead = lead
        self.following = following
        self.dynamic: dict[str, str] = {}  # fresh challengers the monitor started -> base
        self._staged: LearnerCheckpoint | None = None
        self._rollbacks_after = 0.0  # unix seconds: rollbacks after this are not applied yet
        self._next_poll = 0.0
        self.unsure = UnsureMoves(registry)  # pointer moves whose call raised

    def follow(self, now: float, force: bool = False) -> list[Output]:
        """Train the fresh challengers the monitor started, drop the retired ones, and
        continue a rolled-back candidate from the version it was rolled back to.

        Reads the registry at most every ``following.poll_s``; returns model-events.
        Every read (and the one write) of the registry comes before anything changes
        here: one that raises (Redis down) leaves nothing half-followed, and the next
        call follows it all. A pointer move of this learner whose call raised but
        was applied (its reply lost) gets its model-event here.
        """
        if now < self._next_poll and not force:
            return []
        settled = self.unsure.applied()  # a move whose reply was lost: logged here
        wanted = {name: info["base"] for name, info in self.registry.challengers().items()}
        pointer = self.registry.champion()
        serving = pointer.model if pointer else None
        # retired: dropped, unless champion (what is served keeps training)
        drop = [n for n in self.dynamic if n not in wanted and n != serving]
        start = {n: (b, self._fresh(n, b)) for n, b in wanted.items() if n not in self.candidates}
        back = self._read_rollback(pointer, (self.candidates.keys() - set(drop)) | start.keys())
        self._next_poll = now + self.following.poll_s
        self.unsure.clear()
        out = [self._model_event(move.as_event()) for move, _ in settled]
        for name in drop:
            del self.candidates[name], self.dynamic[name]
            out.append(self._model_event(ModelEvent(kind="dropped", model=name,
                                                    version=0, reason="retired")))  # fmt: skip
        for name, (base, model) in start.items():
            self.candidates[name] = Candidate(name, model, 0, self.following.new_metrics())
            self.dynamic[name] = base
            out.append(self._model_event(ModelEvent(kind="started", model=name, version=0,
                                                    reason=f"fresh {base}")))  # fmt: skip
        self._rollbacks_after = back.seen
        if back.move is not None:
            c, to, why = self.candidates[back.move.to.model], back.move.to, back.move.reason
            c.model, c.version = back.model, to.version
            out.append(self._model_event(ModelEvent(kind="rebased", model=c.name,
                                                    version=c.version, reason=why)))  # fmt: skip
            if back.again is not None:
                out.append(self._model_event(back.again.as_event()))
        return out

    def _fresh(self, name: str, base: str) -> Any:
        model = self.following.fresh_model(base)
        if model is None:
            raise ModelSpecError(
                f"fresh challenger {name!r} of {base!r}: not a candidate of the spec"
            )
        return model

    def _read_rollback(self, pointer: ChampionPointer | None, names: AbstractSet[str]) -> _Rollback:
        """The newest rollback not followed yet, to one of ``names``: the version to
        continue from, loaded.

        Looks at the last moves, not only the last one: a snapshot published just
        after a rollback to the version it continued may have advanced the
        pointer again; that advance is rolled back too (the write made here).
        """
        moves = self.registry.recent_moves(10)
        seen = max([self._rollbacks_after, *(m.at for m in moves)])
        new = [m for m in moves if m.at > self._rollbacks_after]
        back = next((m for m in reversed(new) if m.kind == "rollback"), None)
        if back is None or back.to.model not in names:
            return _Rollback(seen)
        to = back.to
        model = self.registry.load(to.model, to.version).model
        model = self._continued(to.model, self.dynamic.get(to.model, to.model), to.version, model)
        again = None
        if pointer is not None and pointer.model == to.model and pointer.version > to.version:
            with self.unsure.attempt("rollback", to):
                again = self.registry.move(to, "rollback", pointer, f"re-applied: {back.reason}")
            if again is not None:
                seen = again.at
        return _Rollback(seen, back, model, again)

    def publish(
        self,
        out: list[Output],
        now: float,
        labels_seen: int,
        positions: Mapping[int, int],
        pending: Sequence[tuple[Message, Label]],
        searches: Mapping[str, dict[str, Any]] | None = None,
        timeouts: Mapping[int, int] | None = None,
    ) -> None:
        """Publish every candidate as a new version and stage the checkpoint of what the
        learner has done (``labels_seen``, its read ``positions``, the labels still
        ``pending``, where its ``searches`` and its labels by ``timeouts`` are);
        adds the model-events to write to ``out`` as it goes (a registry call that
        raises midway leaves there the events of what was done before it)."""
        out += self.follow(now, force=True)
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
            self._check_size(c.name, c.version)
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

    def _check_size(self, name: str, version: int) -> None:
        """A WARNING when ``name``'s version passes ``size_warn_bytes``, and again each
        time it doubles since: a model that grows with the stream (a Hoeffding tree,
        up to its ``max_size``) costs every version's publish and load more."""
        size = self.registry.published_bytes.get(name, 0)
        threshold = max(self.size_warn_bytes, 2 * self._warned_bytes.get(name, 0))
        if not self.size_warn_bytes or size < threshold:
            return
        self._warned_bytes[name] = size
        keep = self.registry.keep_versions
        log.warning(
            "model %r v%d is %.2f MB signed (warned from %.2f MB): it grows with what it "
            "learns, every scorer loads each new champion on its main thread (its batch "
            "waits) and Redis keeps %s of it; bound it in the spec (a Hoeffding tree's "
            "max_size, MB of memory, checked every memory_estimate_period labels) or "
            "raise RIVERFLOW_MODEL_SIZE_WARN_MB",
            name, version, size / 2**20, self.size_warn_bytes / 2**20,
            "every version" if keep is None else f"up to {keep} versions",
        )  # fmt: skip

    def _advance(self, name: str, parent: int, version: int) -> PointerMove | None:
        """Move the pointer from ``name``'s ``parent`` version to ``version``, if it still
        follows the learner; the move made, or None."""
        expect = ChampionPointer(name, parent) if parent else None
        to = ChampionPointer(name, version)
        with self.unsure.attempt("advance", to):
            moved = self.registry.move(to, "advance", expect)
            if moved is None:
                current = self.registry.champion()
                if self._left_behind(current, name, parent):
                    moved = self.registry.move(to, "advance", current)
        return moved

    def _left_behind(self, pointer: ChampionPointer | None, name: str, parent: int) -> bool:
        """Whether ``pointer``, not at ``name``'s ``parent``, still follows the learner:
        a version a dead run published after ``parent`` (see ``_orphan_of``), or where
        an advance that failed (Redis down) left it: nothing (the lead's first
        advance) or an older version of ``name`` the last move advanced it to. Never
        where a promotion or a rollback put it."""
        if pointer is None:
            return name == self.lead and not self.registry.recent_moves(1)
        if pointer.model != name or not parent:
            return False
        if pointer.version > parent:
            return self._orphan_of(pointer, name, parent)
        last = self.registry.recent_moves(1)
        return bool(last) and last[-1].kind == "advance" and last[-1].to == pointer

    def _orphan_of(self, pointer: ChampionPointer, name: str, parent: int) -> bool:
        """Whether ``pointer`` is a version of ``name`` that a dead run of this learner
        published after ``parent`` without committing it: it still follows the learner."""
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
                model = self.registry.load(c.name, version).model
                c.model, c.version = self._continued(c.name, c.name, version, model), version
                c.metrics = metrics_from_state(saved.metrics[c.name])
        for name, info in self.registry.challengers().items():
            if name not in saved.versions or name in self.candidates:
                continue
            fresh = self.following.fresh_model(info["base"])
            if fresh is None:  # its base left the spec
                continue
            v = saved.versions[name]
            model = (
                self._continued(name, info["base"], v, self.registry.load(name, v).model)
                if v
                else fresh
            )
            metrics = metrics_from_state(saved.metrics[name])
            self.candidates[name] = Candidate(name, model, v, metrics)
            self.dynamic[name] = info["base"]
        self._rollbacks_after = saved.saved_at

    def _continued(self, name: str, base: str, version: int, model: Any) -> Any:
        """``model``, ``name``'s stored ``version``, given the spec's bounds as its
        candidate ``base`` now has them (``reconcile``: how big a tree may grow); the
        other parameters the spec changed since are kept as stored. Both are logged
        (WARNING: the model differs from what it was, or from what the spec says)."""
        spec_model = self.following.fresh_model(base)
        if spec_model is None:  # its base left the spec
            return model
        done = reconcile(model, spec_model)
        if done.applied:  # (once: the versions published from here on have them)
            log.warning("model %r v%d continues with the spec's %s (and what it learned)",
                        name, version, "; ".join(done.applied))  # fmt: skip
        if done.kept:
            log.warning(
                "model %r v%d continues as it was made, not with the spec's %s: what it "
                "learned was learned with those; a changed parameter applies to a fresh "
                "candidate only (give it a new name to train one from the start)",
                name, version, "; ".join(done.kept),
            )  # fmt: skip
        return model

    def _model_event(self, event: ModelEvent) -> Output:
        return Output(self.topics.model_events, event.model.encode(), event.encode())
