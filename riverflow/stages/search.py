"""The learner's model searches: each searched candidate's configurations
(``riverflow.models.search``) trained beside the candidates, their survivors made
candidates, new rounds after a drift alarm, and their place in the checkpoint.

The learner stage (``riverflow.stages.learner``) hands every label it learns to
``Searches.learn`` after its candidates, and its snapshots to ``Searches.publish``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.models.registry import ChampionPointer, ModelRegistry
from riverflow.models.search import SuccessiveHalving
from riverflow.monitors.prequential import PrequentialMetrics
from riverflow.stages.lineage import Candidate
from riverflow.streams.contracts import ModelEvent


def in_search(name: str) -> str:
    """The registry name a configuration's versions go by while it is searched: apart
    from its versions as a candidate, once it survived (a new round may search a
    survivor's configuration again)."""
    return f"{name}#search"


class Searches:
    """The spec's searches as the learner runs them.

    - every configuration alive learns each label after the candidates;
    - a finished round's survivors join the candidates as challengers (named after
      their configuration: ``fraud-logreg@lr=0.05,l2=0``), so the monitor promotes,
      rolls back and retires them like any other; survivors of the round before
      that do not survive again leave, unless serving;
    - a drift alarm of the champion, as the monitor answers it (a fresh challenger
      appears in the registry), starts a new round of each search whose
      ``on_drift`` is not ``off``; ``warm`` gives each survivor's configuration a
      copy of the survivor's model, the other configurations start fresh. An alarm
      during a round's first rung restarts nothing (a search restarted on each
      alarm of a shaky detector would never finish);
    - at each snapshot the configurations alive are published to the registry
      (as ``in_search(name)``; no model-event: they serve nobody) and the checkpoint
      records where each round is, so a restarted learner continues the round
      exactly where the one that saved left it.
    """

    def __init__(self, runs: Sequence[SuccessiveHalving]) -> None:
        self.runs = {r.plan.base: r for r in runs}
        self.survivors: dict[str, str] = {}  # survivor candidate -> its search's base
        self.events: list[ModelEvent] = [r.start("the spec's search") for r in runs]
        self.challengers: set[str] = set()  # the fresh challengers known so far
        # survivors a later round dropped -> their base: the monitor may still promote
        # one (its duel passed, a cool-down held it back), see ``adopt``
        self.dropped: dict[str, str] = {}

    def owner(self, name: str) -> SuccessiveHalving | None:
        """The search ``name`` is a configuration of, if any."""
        return next((r for r in self.runs.values() if name in r.plan.values), None)

    def follow(self, challengers: Mapping[str, str], candidates: dict[str, Candidate]) -> None:
        """A fresh challenger new since the last call: the monitor's answer to a drift
        alarm of the champion. New rounds start (their events go out with the next
        label)."""
        new = sorted(set(challengers) - self.challengers)
        self.challengers = set(challengers)
        if not new:
            return
        why = f"drift alarm of the champion (fresh challenger {', '.join(new)})"
        for run in self.runs.values():
            if run.plan.on_drift == "off" or (not run.done and run.rung == 0):
                continue
            warm = {}
            if run.plan.on_drift == "warm":
                warm = {n: candidates[n].model for n, b in self.survivors.items()
                        if b == run.plan.base and n in candidates}  # fmt: skip
            self.events.append(run.start(why, warm))

    def rung_ends_next(self) -> bool:
        """Whether the next label ends a rung of some search, so may end its round:
        the survivors then join knowing which candidate serves, and the learner reads
        that before it learns the label (a read that raises leaves it unlearned)."""
        return any(not r.done and r.seen + 1 >= r.rung_end for r in self.runs.values())

    def learn(
        self,
        x: dict[str, Any],
        label: bool,
        candidates: dict[str, Candidate],
        serving: str,
    ) -> list[ModelEvent]:
        """One label for every search; the model-events it led to. ``serving``: the
        candidate the champion pointer names (a survivor serving never leaves), read
        when ``rung_ends_next`` says so (it is not used otherwise)."""
        events, self.events = self.events, []
        for run in self.runs.values():
            if run.done:
                continue
            events += run.learn(x, label)
            if run.done:
                events += self._join(run, candidates, serving)
        return events

    def _join(
        self, run: SuccessiveHalving, candidates: dict[str, Candidate], serving: str
    ) -> list[ModelEvent]:
        events = []
        survivors = run.take_survivors()
        names = {c.name for c in survivors}
        why = f"round {run.round} of the search of {run.plan.base}"
        for name in [n for n, b in self.survivors.items() if b == run.plan.base]:
            if name in names or name == serving or name not in candidates:
                continue
            del candidates[name]
            self.dropped[name] = self.survivors.pop(name)
            events.append(ModelEvent(kind="dropped", model=name, version=0, by="learner",
                                     reason=f"not a survivor of {why}"))  # fmt: skip
        for c in survivors:
            # a survivor already a candidate keeps its line when it serves (its model
            # changes only by learning) or when the round was warm (it had a copy)
            if c.name in candidates and (c.name == serving or run.plan.on_drift != "fresh"):
                continue
            assert isinstance(c.metrics, PrequentialMetrics)
            candidates[c.name] = Candidate(c.name, c.model, 0, c.metrics)
            self.survivors[c.name] = run.plan.base
            self.dropped.pop(c.name, None)
            events.append(ModelEvent(kind="started", model=c.name, version=0, by="learner",
                                     reason=f"survived {why}",
                                     evidence={"values": c.values}))  # fmt: skip
        return events

    def adopt(
        self,
        pointer: ChampionPointer | None,
        registry: ModelRegistry,
        candidates: dict[str, Candidate],
    ) -> list[ModelEvent]:
        """A dropped survivor the champion pointer names (the monitor promoted it after
        the learner dropped it) is trained again, from the version served."""
        if pointer is None or pointer.model not in self.dropped:
            return []
        name, version = pointer.model, pointer.version
        model = registry.load(name, version).model  # first: a load that raises changes nothing
        self.survivors[name] = self.dropped.pop(name)
        candidates[name] = Candidate(name, model, version, PrequentialMetrics())
        return [ModelEvent(kind="started", model=name, version=version, by="learner",
                           reason=f"serving: continued from v{version}")]  # fmt: skip

    def publish(self, registry: ModelRegistry, labels_seen: int) -> dict[str, dict[str, Any]]:
        """Publish each configuration alive; where each round is, for the checkpoint."""
        for run in self.runs.values():
            for c in run.alive.values():
                meta = {"model": c.name, "parent": c.version, "labels_seen": labels_seen,
                        "metrics": c.metrics.as_dict(), "search": run.plan.base}  # fmt: skip
                c.version = registry.publish(in_search(c.name), c.model, meta)
        return {base: run.state() for base, run in self.runs.items()}

    def restore(
        self, saved: LearnerCheckpoint, registry: ModelRegistry, candidates: dict[str, Candidate]
    ) -> None:
        """Before the lineage restores: the survivors in ``saved`` become candidates
        again (the lineage then loads their versions), and each round continues where
        ``saved`` says. A search the checkpoint does not know (new in the spec, or
        whose configurations changed) starts its first round."""
        for name in saved.versions:
            run = self.owner(name)
            if run is not None and name not in candidates:
                candidates[name] = Candidate(name, run.build(name), 0, PrequentialMetrics())
                self.survivors[name] = run.plan.base
        for base, run in self.runs.items():
            state = saved.searches.get(base)
            if state is None or not set(state["alive"]) <= set(run.plan.values):
                continue
            run.restore(state, lambda n, v: registry.load(in_search(n), v).model)
            self.events = [e for e in self.events if e.model != base]
