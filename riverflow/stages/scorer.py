"""The scorer stage: events -> validate -> features (one store call) -> champion ->
predictions (what fits the label: ``models.target``).

It holds no I/O of its own beyond the store and registry it is given, so the
Kafka runtime, the embedded runtime and the benchmark run it unchanged.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any

import orjson

from riverflow.features.definitions import FeaturePlan
from riverflow.features.labelled import LabelFeatures
from riverflow.features.store import FeatureRequest, FeatureSnapshot, FeatureStore, feature_request
from riverflow.models.batched import positive_probabilities
from riverflow.models.champion import ChampionReplica, positive_probability
from riverflow.models.cleaning import FieldCleaning, cleaning_of
from riverflow.models.explain import explain
from riverflow.models.registry import ModelVersion
from riverflow.models.target import Target
from riverflow.stages.common import (
    DLQ_KEEP_BYTES,
    StageCounters,
    dead_letter,
    model_inputs,
    monitor_only_field,
)
from riverflow.stages.quality import DataQuality
from riverflow.streams.contracts import (
    UNSET,
    LabelType,
    Message,
    ModelEvent,
    Output,
    Prediction,
    ServedPrediction,
    Unset,
    pair_id,
)
from riverflow.streams.pii import Pseudonymizer
from riverflow.streams.schema import EventSchema
from riverflow.streams.topics import Topics
from riverflow.streams.validation import Bounds, Invalid, RecordValidator, SlateValidator

# where a snapshot's context keeps the label-fed values read for it, beside the stored
# inputs (a spec with label-fed features names no model input with an "@")
LABELLED = "@labelled"


class Scorer:
    """events -> validate -> features (one store call) -> champion -> predictions,
    and the prediction served for each event recorded with its snapshot (a second
    store call) for the learner to join.

    A replayed event whose served prediction is stored gets that prediction
    again, not a new one from the current champion: the first answer is the one
    the user got, and the one the learner evaluates.

    Label-fed features (``label_features``, ``features.labelled``) are read for the
    whole batch in one more round trip, at each event's time, before the store
    call; their values are stored in the event's snapshot (under ``@labelled``,
    beside its model inputs), so a replay is served the values its first scoring
    read, not what the learner has learned since.
    """

    stage = "scorer"

    def __init__(
        self,
        topics: Topics,
        schema: EventSchema,
        plan: FeaturePlan,
        inputs: Sequence[str],
        store: FeatureStore,
        champion: ChampionReplica,
        max_event_bytes: int,
        clock: Callable[[], float] = time.time,
        explain_top: int = 0,
        segment: str | None = None,
        bounds: Bounds | None = None,
        dlq_keep_bytes: int = DLQ_KEEP_BYTES,
        pii: Pseudonymizer | None = None,
        clean: Mapping[str, FieldCleaning] | None = None,
        quality: DataQuality | None = None,
        target: Target | None = None,
        label_features: LabelFeatures | None = None,
    ) -> None:
        self.topics = topics
        self.labelled = label_features
        self.target = target or Target()
        self._binary = self.target.type is LabelType.BOOL
        # personal fields tokenised (or dropped) right after validation: nothing after
        # it, store, model, prediction or log, sees them in clear
        self.pii = pii if pii else None
        self.pii_key = None if self.pii is None else self.pii.key_id
        self.explain_top = explain_top
        self.schema = schema
        self.plan = plan
        self.inputs = list(inputs)
        # the snapshot keeps the segment field too, so the learner can tell the monitor
        self.extra = monitor_only_field(segment, self.inputs)
        self.stored = self.inputs + ([self.extra] if self.extra else [])
        self.store = store
        self.champion = champion
        self.clock = clock
        # the spec's cleaning: optional fields pass validation as None; the serving
        # model's ``Clean`` step imputes the values features need, and (in its
        # pipeline) cleans the model inputs, which are stored raw for the learner
        self.clean = dict(clean or {})
        optional = {name for name, rule in self.clean.items() if rule.optional}
        self.categorical = [n for n, r in self.clean.items() if r.max_categories is not None]
        self.validate: RecordValidator | SlateValidator = RecordValidator(
            schema.fields, max_event_bytes, bounds, optional=optional
        )
        self.slate = schema.slate
        if self.slate is not None:  # ranking requests (``events.slate``)
            self.validate = SlateValidator(self.validate, self.slate)
            self.item_inputs = [n for n in self.stored if n in self.slate.fields]
            self.request_inputs = [n for n in self.stored if n not in self.slate.fields]
        self.quality = quality or DataQuality(schema.fields)
        self.dlq_keep_bytes = dlq_keep_bytes
        self.counters = StageCounters()

    def process(self, batch: Sequence[Message]) -> list[Output]:
        # the cyclic collector waits for the batch: what a batch makes (requests,
        # snapshots, vectors, per slate pair) lives until its outputs are built, so
        # each collection during it walked and promoted all of it, and the promoted
        # objects set off full collections (a third of a slate batch's CPU). After
        # the batch, one young collection walks what outlives it; a cycle the batch
        # made is collected then. A caller that turned the collector off keeps it off
        if not gc.isenabled():
            return self._process(batch)
        gc.disable()
        try:
            return self._process(batch)
        finally:
            gc.enable()

    def _process(self, batch: Sequence[Message]) -> list[Output]:
        self.counters.consumed += len(batch)
        if self.slate is not None:
            return self._process_slates(batch)
        out: list[Output] = []
        events: list[dict[str, Any]] = []
        raws: list[dict[str, Any]] = []
        cleaned: list[dict[str, str]] = []
        now = self.clock()
        self.champion.refresh()
        cleaner = cleaning_of(self.champion.current.model) if self.clean else None
        quality, time_field = self.quality, self.schema.time
        for _, event in self._intake(batch, now, out):
            raw = event
            done: dict[str, str] = {}
            if cleaner is not None:
                new = [n for n in self.categorical if cleaner.is_new(n, event[n])]
                clean, report = cleaner.clean(raw)
                done = dict(report)
                quality.observe(raw, report, new)
                # features aggregate the values events carried: only a missing one is
                # filled in (with what the serving model imputes). Clipping and buckets
                # are the models' (their Clean step): features stay a function of the
                # stream, not of which version served when
                if "impute" in done.values():
                    event = dict(raw)
                    event.update((f, clean[f]) for f, rule in report if rule == "impute")
            else:
                quality.observe(raw, ())
            events.append(event)
            raws.append(raw)
            cleaned.append(done)
        labelled = self._read_labelled(events, [e[time_field] for e in events])
        requests = [self._request(e, r, v) for e, r, v in zip(events, raws, labelled, strict=True)]
        return self._finish(out, now, requests, lambda snaps: self._score(events, snaps, cleaned))

    def _intake(
        self, batch: Sequence[Message], now: float, out: list[Output]
    ) -> Iterator[tuple[Message, Any]]:
        """The valid events of ``batch`` with their messages (their personal fields
        tokenised, their freshness noted); each message that is none goes to ``out`` as
        a dead letter."""
        quality, time_field = self.quality, self.schema.time
        for msg in batch:
            event = self.validate(msg.value)
            if isinstance(event, Invalid):
                out.append(self._refuse(msg, event))
                continue
            if self.pii is not None:
                self.pii.apply(event)
            quality.fresh(msg.partition, now - event[time_field])
            yield msg, event

    def _finish(
        self,
        out: list[Output],
        now: float,
        requests: list[FeatureRequest],
        score: Callable[
            [list[FeatureSnapshot]], tuple[list[Output], list[tuple[str, ServedPrediction]]]
        ],
    ) -> list[Output]:
        """The batch's feature store call and its predictions (``score``), after the dead
        letters in ``out`` and the schema changes; the outputs to write."""
        if self.validate.undeclared:
            self.quality.undeclared(self.validate.undeclared)
            self.validate.undeclared.clear()
        self.counters.dead_letters += len(out)
        out += self._schema_changes(now)
        # the store may hold the feature writes back and make them with the
        # predictions, in one round trip (record_served)
        snapshots = self.store.update_and_read(requests, commit=False)
        scored, served = score(snapshots)
        # before the outputs leave: a prediction is never emitted without its record
        if not self.store.record_served(served):
            # refused: replays, or entities another scorer changed. Nothing was
            # written; the store runs the batch again on what it holds
            snapshots = self.store.update_and_read(requests)
            scored, served = score(snapshots)
            self.store.record_served(served)
        self.counters.late_events += sum(s.late and not s.replayed for s in snapshots)
        # (a request refused once its pairs were read: see _rank)
        self.counters.dead_letters += sum(o.topic == self.topics.dlq for o in scored)
        out += scored
        self.counters.produced += len(out)
        return out

    def _refuse(self, msg: Message, invalid: Invalid) -> Output:
        """The dead letter of a message that is no valid event (its personal fields
        scrubbed)."""
        self.quality.refused(invalid)
        return self._dead_letter(msg, invalid.kind, invalid.message)

    def _dead_letter(self, msg: Message, kind: str, why: str) -> Output:
        if self.pii is not None:
            msg, note = self.pii.scrub(msg)
            why += note
        return dead_letter(self.topics, self.stage, msg, kind, why, self.dlq_keep_bytes)

    def _process_slates(self, batch: Sequence[Message]) -> list[Output]:
        """Ranking requests: every (request, candidate) pair's features in one store
        call for the batch, its score from the champion, and one prediction per
        request with its candidates ranked (``Prediction.slate``)."""
        assert self.slate is not None
        out: list[Output] = []
        requests: list[tuple[Message, dict[str, Any], list[dict[str, Any]]]] = []
        pairs: list[FeatureRequest] = []
        now = self.clock()
        self.champion.refresh()
        s, item_id, plan = self.schema, self.slate.item_id, self.plan
        for msg, event in self._intake(batch, now, out):
            items = event.pop(self.slate.field)
            self.quality.observe(event, ())
            requests.append((msg, event, items))
        merged = [{**event, **item} for _, event, items in requests for item in items]
        labelled: Iterator[dict[str, float] | None] = repeat(None)
        if self.labelled is not None:  # every pair's, in one read
            labelled = iter(self._read_labelled(merged, [pair[s.time] for pair in merged]))
        fields = iter(merged)
        for _, event, items in requests:
            request_id, ts = event[s.event_id], event[s.time]
            counted: dict[str, set[str]] = {}  # entity -> values this request counted in
            for item in items:
                pair = next(fields)
                context, inputs = self._context(pair, next(labelled))
                entities = plan.entity_values(pair)
                # a request counts once in each entity it touches: with its first pair
                seen = []
                for name, value in entities.items():
                    values = counted.get(name)
                    if values is None:
                        counted[name] = {value}
                    elif value in values:
                        seen.append(name)
                    else:
                        values.add(value)
                pid = pair_id(request_id, item[item_id])
                pairs.append(feature_request(plan, pair, pid, ts, context, entities,
                                             tuple(seen), inputs))  # fmt: skip
        return self._finish(out, now, pairs, lambda snaps: self._rank(requests, pairs, snaps))

    def _rank(
        self,
        requests: list[tuple[Message, dict[str, Any], list[dict[str, Any]]]],
        pairs: list[FeatureRequest],
        snapshots: list[FeatureSnapshot],
    ) -> tuple[list[Output], list[tuple[str, ServedPrediction]]]:
        """Each request's prediction: its candidates by score (the first of equals
        first), and the pairs' served predictions to record. A request whose id was
        ranked before with other candidates goes to the dead letters (``_aggregates``)."""
        assert self.slate is not None
        model = self.champion.current
        now, plan, schema, shown = self.clock(), self.plan, self.schema, self.slate.shown
        # the entity of each aggregate: tile groups', then session groups'
        groups = [g.entity_name for g in plan.groups] + [g.entity_name for g in plan.sessions]
        out: list[Output] = []
        served: list[tuple[str, ServedPrediction]] = []
        ranked: list[tuple[dict[str, Any], list[list[Any]]]] = []  # request, [item, answer, ...]
        unserved: list[list[Any]] = []  # the pairs first scored now
        xs: list[dict[str, Any]] = []
        at = 0
        for msg, event, items in requests:
            n = len(items)
            aggregates = _aggregates(groups, pairs[at : at + n], snapshots[at : at + n])
            if aggregates is None:
                why = (
                    f"request id {event[schema.event_id]!r} was ranked before with other "
                    "candidates: a request id names one request (a new slate needs a new id)"
                )
                out.append(self._dead_letter(msg, "wrong_value", why))
                at += n
                continue
            rows = []
            for item, snap, values in zip(items, snapshots[at : at + n], aggregates, strict=True):
                stored, features = self._served_with(snap, plan.values(values))
                row: list[Any] = [item, snap.served, features, snap]
                if snap.served is None:
                    unserved.append(row)
                    xs.append({**model_inputs(stored, self.extra), **features})
                rows.append(row)
            ranked.append((event, rows))
            at += n
        # the batch's pairs in one call: a factorization machine scores them at once
        for row, p in zip(unserved, positive_probabilities(model.model, xs), strict=True):
            row[1] = answer = ServedPrediction(model.name, model.version, p)
            served.append((row[3].event_id, answer))
        for event, rows in ranked:
            rows.sort(key=lambda r: -(r[1].probability or 0.0))  # stable: ties keep order
            served_order, propensities = self._explore(event[schema.event_id], rows)
            slate = [
                {"item": item[self.slate.item_id], "position": position,
                 "score": answer.probability, "shown": position < shown,
                 "propensity": propensity,
                 "inputs": {n: item[n] for n in self.item_inputs}, "features": features}
                for position, ((item, answer, features, _), propensity)
                in enumerate(zip(served_order, propensities, strict=True))
            ]  # fmt: skip
            head = rows[0][1]
            entity = str(event[schema.key])
            prediction = Prediction(
                event[schema.event_id], entity, None, head.model, head.version, {},
                event[schema.time], now, all(r[3].replayed for r in rows),
                inputs={n: event[n] for n in self.request_inputs}, pii_key=self.pii_key,
                slate=slate, shown=min(shown, len(slate)),
            )  # fmt: skip
            out.append(Output(self.topics.predictions, entity.encode(), prediction.encode()))
        return out, served

    def _read_labelled(
        self, events: Sequence[Mapping[str, Any]], times: Sequence[float]
    ) -> list[dict[str, float] | None]:
        """The label-fed features of each event (a slate's pair) at its time: one read
        for the batch; Nones (no read) without label-fed features."""
        if self.labelled is None or not events:
            return [None] * len(events)
        return list(self.labelled.read(events, times))

    def _context(
        self, event: Mapping[str, Any], labelled: dict[str, float] | None
    ) -> tuple[bytes, dict[str, Any]]:
        """The snapshot's context: the stored inputs, and the label-fed values read;
        as JSON and as the dictionary it encodes (the values of a valid event, JSON's
        own: the store's snapshot takes it as it is)."""
        stored = {name: event[name] for name in self.stored}
        if labelled is not None:
            stored[LABELLED] = labelled
        return orjson.dumps(stored), stored

    def _served_with(
        self, snap: FeatureSnapshot, features: dict[str, float]
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """A snapshot's stored inputs, and its features with the label-fed ones its
        context holds (those read when it was first scored: a replay gets them too)."""
        if self.labelled is None:
            return snap.inputs, features
        stored = dict(snap.inputs)  # (a copy, then a pop: twice as fast as a comprehension)
        labelled = stored.pop(LABELLED, None)
        # (a snapshot stored by a scorer without them has none: they are left out)
        return stored, {**features, **labelled} if labelled else features

    def _explore(self, request_id: str, ranked: list[Any]) -> tuple[list[Any], list[float]]:
        """The order a request is served in (epsilon-greedy: with chance ``epsilon`` a
        uniformly random one, else ``ranked``) and each position's propensity, the
        chance the policy put that item there: ``(1 - epsilon) * [ranked has it there]
        + epsilon / n``. The draw is seeded by the request id, so a replayed request
        is served the same order."""
        assert self.slate is not None
        epsilon, n = self.slate.epsilon, len(ranked)
        if epsilon == 0.0:
            return ranked, [1.0] * n
        rng = random.Random(f"explore:{request_id}")
        order = ranked
        if rng.random() < epsilon:
            order = list(ranked)
            rng.shuffle(order)
        uniform = epsilon / n
        return order, [
            (1.0 - epsilon) * (o is r) + uniform for o, r in zip(order, ranked, strict=True)
        ]

    def _schema_changes(self, now: float) -> list[Output]:
        """A ``schema_change`` model-event for each change the data quality saw."""
        out = []
        for change in self.quality.changes():
            event = ModelEvent("schema_change", self.champion.name, self.champion.version,
                               at=now, evidence=change, by=self.stage)  # fmt: skip
            out.append(Output(self.topics.model_events, b"", event.encode()))
        return out

    def _score(
        self,
        events: list[dict[str, Any]],
        snapshots: list[FeatureSnapshot],
        cleaned: list[dict[str, str]],
    ) -> tuple[list[Output], list[tuple[str, ServedPrediction]]]:
        """The prediction of each event, and those to record (a replayed event
        re-emits the one served before)."""
        self.champion.refresh()
        model = self.champion.current
        now = self.clock()
        out: list[Output] = []
        served: list[tuple[str, ServedPrediction]] = []
        for event, snap, done in zip(events, snapshots, cleaned, strict=True):
            output, prediction = self._predict(event, snap, model, now, done)
            out.append(output)
            if snap.served is None:
                served.append((snap.event_id, prediction))
        return out, served

    def redact(self, msg: Message) -> tuple[Message, str]:
        """A message as the dead letters may keep it (``streams.pii``)."""
        return (msg, "") if self.pii is None else self.pii.scrub(msg)

    def status(self) -> dict[str, float]:
        return {
            "model_version": float(self.champion.version),
            "late_events": float(self.counters.late_events),
            **self.quality.status(),
            # where the feature store computed: a scorer whose commits keep being
            # refused (other scorers share its entities) runs on Redis
            **{f"feature_batches_{k}": float(v) for k, v in self.store.batches.items()},
        }

    def _request(
        self,
        event: dict[str, Any],
        raw: dict[str, Any] | None = None,
        labelled: dict[str, float] | None = None,
    ) -> FeatureRequest:
        """Features from ``event`` (its missing values imputed); the inputs stored
        as ``raw`` held them (the model's pipeline cleans them, in the scorer and the
        learner alike), with the label-fed values read for it."""
        s = self.schema
        context, inputs = self._context(event if raw is None else raw, labelled)
        return feature_request(
            self.plan, event, event[s.event_id], event[s.time], context, inputs=inputs
        )

    def _predict(
        self,
        event: dict[str, Any],
        snap: FeatureSnapshot,
        model: ModelVersion,
        now: float,
        cleaned: dict[str, str],
    ) -> tuple[Output, ServedPrediction]:
        stored, features = self._served_with(snap, self.plan.values(snap.aggregates))
        x = {**model_inputs(stored, self.extra), **features}
        served = snap.served
        if served is None:
            if self._binary:
                served = ServedPrediction(
                    model.name, model.version, positive_probability(model.model, x)
                )
            else:
                _, p = self.target.predict(model.model, x, model.version)
                served = ServedPrediction(model.name, model.version, None, p.value, p.probabilities)
        entity = str(event[self.schema.key])
        # the model that served it explains it; a replay served by an older version is not
        explanation: list[dict[str, Any]] | Unset | None = UNSET
        if self.explain_top and (served.model, served.version) == (model.name, model.version):
            explanation = explain(model.model, x, self.explain_top)
        # positional, in the order of the fields: keywords cost 0.3 us more per record
        prediction = Prediction(
            snap.event_id,
            entity,
            served.probability,
            served.model,
            served.version,
            features,
            event[self.schema.time],
            now,
            snap.replayed,
            explanation,
            stored,
            self.pii_key,
            served.value,
            served.probabilities,
            cleaned,
        )
        return Output(self.topics.predictions, entity.encode(), prediction.encode()), served


def _aggregates(
    groups: list[str], pairs: Sequence[FeatureRequest], snapshots: Sequence[FeatureSnapshot]
) -> list[list[Any]] | None:
    """The aggregates of each pair of one request. A pair that did not count in an
    entity (the request counted there with another pair) has the aggregates of the pair
    that did, wherever that one is in the request: a replayed request may list its
    candidates in another order. None if that pair is not in the request: its id was
    ranked before with other candidates, whose aggregates it points at."""
    counted: dict[tuple[int, str], list[Any]] = {}
    for req, snap in zip(pairs, snapshots, strict=True):
        for gi, name in enumerate(groups):
            if isinstance(snap.aggregates[gi], list):
                counted.setdefault((gi, req.entities[name]), snap.aggregates[gi])
    out = []
    for req, snap in zip(pairs, snapshots, strict=True):
        values = list(snap.aggregates)
        for gi, name in enumerate(groups):
            if not isinstance(values[gi], list):
                found = counted.get((gi, req.entities[name]))
                if found is None:
                    return None
                values[gi] = found
        out.append(values)
    return out
