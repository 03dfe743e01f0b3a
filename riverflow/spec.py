"""The pipeline spec: one YAML declaration drives every stage.

Loaded and checked by pydantic at start; every error names the offending field
(``features.2.field: 'amt' is not an event field``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from riverflow.errors import RiverflowError, error_lines
from riverflow.features.definitions import (
    ANY_FIELD,
    Duration,
    FeaturePlan,
    FeatureSource,
    FeatureSpec,
    parse_duration,
)
from riverflow.features.labelled import LabelPlan
from riverflow.models.cleaning import FieldCleaning
from riverflow.models.errors import ModelSpecError
from riverflow.models.factory import build_estimator
from riverflow.models.spec import ModelsSpec
from riverflow.models.target import Target
from riverflow.monitors.drift import DetectorKind
from riverflow.monitors.spec import MonitorSpec
from riverflow.streams.contracts import LabelType
from riverflow.streams.pii import PiiPolicy
from riverflow.streams.schema import NUMERIC, EventSchema, FieldType, LabelSpec, SlateSpec
from riverflow.streams.topics import Topics


class SpecError(RiverflowError):
    """The pipeline spec is missing, unreadable or invalid."""


class PipelineSpec(BaseModel):
    """Events, label, features and models of one pipeline (namespace ``name``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", description="namespace of topics and keys")
    events: EventSchema
    label: LabelSpec
    features: list[FeatureSpec] = Field(default_factory=list)
    allowed_lateness: Duration | None = Field(
        "10m", description="how far behind an entity's newest event an event still counts"
    )
    clean: dict[str, FieldCleaning] = Field(
        default_factory=dict,
        description="per event field: optional, imputation, clipping, category cap "
        "(models.cleaning); applied by every candidate, learned with it",
    )
    models: ModelsSpec
    monitors: MonitorSpec = Field(default_factory=MonitorSpec)

    @model_validator(mode="after")
    def _cross_check(self) -> PipelineSpec:
        fields = self.events.fields
        ev = self.events
        for role, name in (("key", ev.key), ("event_id", ev.event_id), ("time", ev.time)):
            if name not in fields:
                raise ValueError(f"events.{role}: {name!r} is not an event field")
        if fields[ev.time] is not FieldType.TIMESTAMP:
            raise ValueError(f"events.time: {ev.time!r} must have type timestamp")
        if fields[ev.event_id] is not FieldType.STR:
            raise ValueError(f"events.event_id: {ev.event_id!r} must have type str")
        if ev.slate is not None:
            self._check_slate(ev.slate)
        elif self.label.item is not None:
            raise ValueError("label.item: only a slate pipeline (events.slate) labels items")
        fields = ev.pair_fields  # features and models read a pair's (a candidate's too)
        names = set()
        for i, f in enumerate(self.features):
            if f.name in names:
                raise ValueError(f"features.{i}.name: duplicate feature {f.name!r}")
            names.add(f.name)
            if f.source is FeatureSource.LABELS:
                self._check_labelled(i, f)
                continue
            if f.field is not None and f.agg in ANY_FIELD and f.field not in fields:
                raise ValueError(f"features.{i}.field: {f.field!r} is not an event field")
            numeric = fields.get(f.field or "") in NUMERIC
            if f.field is not None and f.agg not in ANY_FIELD and not numeric:
                raise ValueError(f"features.{i}.field: {f.field!r} is not a numeric event field")
            for name in f.entity_fields(ev.key):
                if name not in fields:
                    raise ValueError(f"features.{i}.entity: {name!r} is not an event field")
        for i, name in enumerate(self.models.inputs):
            if name not in fields:
                raise ValueError(f"models.inputs.{i}: {name!r} is not an event field")
            if name.startswith("@") and self.label_features:  # the scorer's snapshot context
                raise ValueError(f"models.inputs.{i}: {name!r}: '@' is reserved with "
                                 "label-fed features")  # fmt: skip
            if name in names:
                raise ValueError(f"models.inputs.{i}: {name!r} is also a feature name")
        roles = {ev.key: "key", ev.event_id: "event_id", ev.time: "time"}
        for name, rule in self.clean.items():
            if name not in fields:
                raise ValueError(f"clean.{name}: not an event field")
            if name in roles and rule.optional:
                raise ValueError(f"clean.{name}: the event's {roles[name]} cannot be optional")
            if name in ev.pii and rule.optional:
                raise ValueError(f"clean.{name}: a personal field (events.pii) cannot be optional")
            if rule.numeric and fields[name] not in NUMERIC:
                raise ValueError(f"clean.{name}: mean, median and clip need a numeric field")
            if rule.max_categories is not None and fields[name] is not FieldType.STR:
                raise ValueError(f"clean.{name}: max_categories needs a str field")
            if rule.value is not None and not _fits(rule.value, fields[name]):
                raise ValueError(f"clean.{name}.value: {rule.value!r} is not a {fields[name]}")
        for i, f in enumerate(self.events_features):
            for field in (f.field, *f.entity_fields(ev.key)):
                how = self.clean.get(field or "")
                if how is not None and how.optional and how.impute is None:
                    raise ValueError(
                        f"features.{i}: {field!r} may be missing (clean.{field}) and has no "
                        "impute: a feature needs a value"
                    )
        if self.monitors.segment is not None and self.monitors.segment not in fields:
            raise ValueError(f"monitors.segment: {self.monitors.segment!r} is not an event field")
        dropped = {n for n, p in ev.pii.items() if p is PiiPolicy.DROP}
        used = [(f"models.inputs.{i}", n) for i, n in enumerate(self.models.inputs)]
        used += [(f"features.{i}", n) for i, f in enumerate(self.features)
                 for n in (f.field if f.source is FeatureSource.EVENTS else None,
                           *f.entity_fields(ev.key)) if n is not None]  # fmt: skip
        used += [("monitors.segment", self.monitors.segment)] if self.monitors.segment else []
        for where, name in used:
            if name in dropped:
                raise ValueError(f"{where}: {name!r} is dropped at intake (events.pii)")
        known = names | set(self.models.inputs)
        for i, c in enumerate(self.models.candidates):
            chosen = [(f"select.{j}", n) for j, n in enumerate(c.select)]
            chosen += [(f"crosses.{j}", n) for j, cross in enumerate(c.crosses) for n in cross]
            for where, name in chosen:
                if name not in known:
                    raise ValueError(
                        f"models.candidates.{i}.{where}: {name!r} is not a model input or a feature"
                    )
        target = Target(self.label.type, self.label.classes)
        for i, c in enumerate(self.models.candidates):
            try:
                estimator = build_estimator(c.estimator)
            except ModelSpecError:
                continue  # the factory names what is wrong with it when the stage builds it
            why = target.misfit(c.estimator.class_path, estimator)
            if why is not None:
                raise ValueError(f"models.candidates.{i}.estimator: {why}")
        if self.label.type.regression and self.monitors.detector.kind is DetectorKind.DDM:
            raise ValueError(
                "monitors.detector.kind: ddm watches 0/1 errors; a number label's drift is "
                "on absolute errors (adwin, page_hinkley or kswin)"
            )
        for i, c in enumerate(self.models.candidates):
            if c.search is not None and self.label.type is not LabelType.BOOL:
                raise ValueError(
                    f"models.candidates.{i}.search: the model search ranks binary "
                    f"classifiers for now, and label.type is {self.label.type}"
                )
        return self

    def _check_labelled(self, i: int, f: FeatureSpec) -> None:
        """A label-fed feature (``features.labelled``): it aggregates the label, keyed
        by fields the learner finds in the scored event's stored inputs."""
        label = self.label
        if label.type not in (LabelType.BOOL, LabelType.INT, LabelType.FLOAT):
            raise ValueError(
                f"features.{i}.source: a label-fed feature aggregates the label, a bool "
                f"or a number, and label.type is {label.type}"
            )
        for role, name in (("field", f.field), ("when", f.when)):
            if name is not None and name != label.field:
                raise ValueError(
                    f"features.{i}.{role}: {name!r} is not the label field {label.field!r} "
                    "(a label-fed feature aggregates the label)"
                )
        fields, ev = self.events.pair_fields, self.events
        # the learner keys each label by its scored event's stored inputs (the model
        # inputs, and the monitors' segment field): what the prediction carries
        stored = {*self.models.inputs, *([self.monitors.segment] if self.monitors.segment else [])}
        for name in f.entity_fields(ev.key):
            if name not in fields:
                raise ValueError(f"features.{i}.entity: {name!r} is not an event field")
            if name not in stored:
                raise ValueError(
                    f"features.{i}.entity: {name!r} is not a model input (models.inputs): "
                    "the learner keys a label by the inputs its prediction carries"
                )
            rule = self.clean.get(name)
            if rule is not None and rule.optional:
                raise ValueError(
                    f"features.{i}.entity: {name!r} may be missing (clean.{name}): the "
                    "learner keys a label by the value the event carried, so a label-fed "
                    "feature's entity must always be present"
                )

    def _check_slate(self, slate: SlateSpec) -> None:
        if self.label.type is not LabelType.BOOL:
            raise ValueError(
                f"label.type: a slate is labelled by clicks (bool), not {self.label.type}"
            )
        if self.label.item is None:
            raise ValueError("label.item: a slate's label names its item (the field of label "
                             "messages holding the item id)")  # fmt: skip
        for name in self.clean:
            if name in slate.fields:
                raise ValueError(f"clean.{name}: a candidate's fields are not cleaned (yet)")

    @property
    def optional_fields(self) -> frozenset[str]:
        """Event fields that may be missing or null (``clean:``)."""
        return frozenset(name for name, rule in self.clean.items() if rule.optional)

    @property
    def topics(self) -> Topics:
        return Topics(self.name)

    @property
    def events_features(self) -> list[FeatureSpec]:
        """The features the scorer computes from events (``source: events``)."""
        return [f for f in self.features if f.source is FeatureSource.EVENTS]

    @property
    def label_features(self) -> list[FeatureSpec]:
        """The features fed by the labels the learner learns (``source: labels``)."""
        return [f for f in self.features if f.source is FeatureSource.LABELS]

    @property
    def lateness_s(self) -> float:
        """``allowed_lateness`` in seconds (0 without)."""
        return parse_duration(self.allowed_lateness) if self.allowed_lateness else 0.0

    def feature_plan(self) -> FeaturePlan:
        """The events-sourced features' plan (the scorer's feature store)."""
        return FeaturePlan.build(self.events_features, self.events.key, self.lateness_s)

    def label_plan(self, wait_s: float = 0.0) -> LabelPlan | None:
        """The label-fed features' plan, or None if the spec has none.

        A label counts at its event's time, and labels come out of that order: by as
        much as events come late (``allowed_lateness``), plus how long after its event
        a label comes: ``label.after`` when the spec labels by timeout (a later label
        message finds the default learned), and ``wait_s`` (the learner's
        ``label_wait_s``) for the learner's own lag. Older than that behind its
        entity's newest label, a label counts nowhere (``LabelWrite.late``)."""
        labelled = self.label_features
        if not labelled:
            return None
        lateness = self.lateness_s + (self.label.after_s or 0.0) + wait_s
        return LabelPlan.build(labelled, self.label.field, self.events.key, lateness)


def _fits(value: object, kind: FieldType) -> bool:
    if kind is FieldType.STR:
        return isinstance(value, str)
    if kind is FieldType.BOOL:
        return isinstance(value, bool)
    if kind is FieldType.INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def shipped_example(name: str) -> Path | None:
    """The spec shipped with riverflow under this name (``fraud``, ``fraud.yaml`` or
    ``examples/fraud.yaml``), or None."""
    path = Path(name)
    if path.parent not in (Path("."), Path("examples")):
        return None
    resource = files("riverflow.examples").joinpath(path.with_suffix(".yaml").name)
    return Path(str(resource)) if resource.is_file() else None


def load_spec(path: Path | str) -> PipelineSpec:
    """Read and validate a spec file; raise ``SpecError`` naming what is wrong.

    A path that names no file but one of the shipped examples (``examples/fraud.yaml``,
    ``fraud``) reads that example, so the documented commands work from any directory.
    """
    path = Path(path)
    if not path.exists():
        path = shipped_example(str(path)) or path
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    return parse_spec(data, source=str(path))


def parse_spec(data: object, source: str = "spec") -> PipelineSpec:
    """Validate an already-parsed spec; errors name the field path."""
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        lines = "\n".join(f"  {line}" for line in error_lines(exc))
        raise SpecError(f"{source} is invalid:\n{lines}") from None
