"""Least privilege: what each stage's Kafka principal and Redis user may do.

Each stage logs in as a principal of its own; ``stage_acls`` lists exactly what
that principal needs on a pipeline's topics, consumer groups and transactional
ids, and nothing else:

=========  ==============================================  =======================================
stage      reads                                           writes
=========  ==============================================  =======================================
scorer     events (group ``riverflow-{ns}-scorer``)        predictions, dlq (transactions: its ids)
learner    labels, predictions (no group: its checkpoint)  evaluations, model-events, dlq
monitor    evaluations, predictions (its group)            model-events, dlq
=========  ==============================================  =======================================

Every stage may also describe the pipeline's topics (a stage checks at start that
they exist) and read their settings (the learner checks the predictions topic's
retention); the learner may read the scorer group's committed offsets (how far
the scorer has got, before it orphans a label). Creating the topics is the
operator's (``riverflow produce`` or an admin), or a principal with ``CREATE``.
"""

from __future__ import annotations

from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
)

from riverflow.features.store.redis_store import key_prefix
from riverflow.spec import PipelineSpec

STAGES = ("scorer", "learner", "monitor")


def stage_acls(spec: PipelineSpec, stage: str, principal: str) -> list[AclBinding]:
    """The ACLs ``principal`` (e.g. ``User:scorer``) needs to run ``stage`` of ``spec``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (scorer, learner or monitor)")
    t = spec.topics
    reads = {"scorer": [t.events], "learner": [t.labels, t.predictions],
             "monitor": [t.evaluations, t.predictions, t.model_events]}[stage]  # fmt: skip
    writes = {"scorer": [t.predictions, t.dlq],
              "learner": [t.evaluations, t.model_events, t.dlq],
              "monitor": [t.model_events, t.dlq]}[stage]  # fmt: skip
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED

    def allow(
        kind: ResourceType, name: str, op: AclOperation, pattern: ResourcePatternType = literal
    ) -> AclBinding:
        return AclBinding(kind, name, pattern, principal, "*", op, AclPermissionType.ALLOW)

    acls = [
        allow(ResourceType.TOPIC, f"{spec.name}.", AclOperation.DESCRIBE, prefixed),
        allow(ResourceType.TOPIC, f"{spec.name}.", AclOperation.DESCRIBE_CONFIGS, prefixed),
    ]
    acls += [allow(ResourceType.TOPIC, name, AclOperation.READ) for name in reads]
    acls += [allow(ResourceType.TOPIC, name, AclOperation.WRITE) for name in writes]
    group = f"riverflow-{spec.name}-{stage}"
    # its own group (the learner's readers name one librdkafka needs, joined by none)
    acls.append(allow(ResourceType.GROUP, group, AclOperation.READ))
    if stage == "learner":  # the scorer group's offsets, read (OffsetFetch), never committed
        acls.append(allow(ResourceType.GROUP, f"riverflow-{spec.name}-scorer",
                          AclOperation.DESCRIBE))  # fmt: skip
    if stage == "scorer":  # exactly once: its transactional ids are "{group}.{instance}"
        for op in (AclOperation.WRITE, AclOperation.DESCRIBE):
            acls.append(allow(ResourceType.TRANSACTIONAL_ID, f"{group}.", op, prefixed))
    return acls


OPERATIONS = {AclOperation.READ: "Read", AclOperation.WRITE: "Write",
              AclOperation.DESCRIBE: "Describe",
              AclOperation.DESCRIBE_CONFIGS: "DescribeConfigs"}  # fmt: skip
RESOURCES = {ResourceType.TOPIC: "--topic", ResourceType.GROUP: "--group",
             ResourceType.TRANSACTIONAL_ID: "--transactional-id"}  # fmt: skip


def acl_commands(acls: list[AclBinding], bootstrap: str = "BROKER:9092") -> list[str]:
    """The same ACLs as ``kafka-acls.sh`` commands, for a cluster riverflow does not
    administer itself."""
    out = []
    for a in acls:
        prefixed = a.resource_pattern_type == ResourcePatternType.PREFIXED
        out.append(
            f"kafka-acls.sh --bootstrap-server {bootstrap} --add --allow-principal "
            f"{a.principal} --operation {OPERATIONS[AclOperation(a.operation)]} "
            f"{RESOURCES[ResourceType(a.restype)]} '{a.name}'"
            + (" --resource-pattern-type prefixed" if prefixed else "")
        )
    return out


def redis_acl_rules(spec: PipelineSpec, stage: str, cluster: bool = False) -> list[str]:
    """The ``ACL SETUSER`` rules (after ``on >password``) of ``stage``'s Redis user:
    any command but the dangerous ones (admin, ``KEYS``, ``FLUSHALL``...), on the
    pipeline's keys the stage uses, read-only where it only reads, and the channel
    of champion moves. The scorer writes entity state and snapshots and only
    reads the registry: it cannot store a version or move the champion pointer.
    The learner (advances the pointer as it publishes) and the monitor (promotes,
    rolls back) write the registry; the operator's own user does the rest
    (``riverflow models``, ``features reset``, ``forget``). With label-fed features
    (``rf:{ns}:lab:``) the learner writes their windows and dedup marks, the scorer
    reads the windows; both may store the layout (whichever starts first)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (scorer, learner or monitor)")
    p = key_prefix(spec.name, cluster)
    registry_read = [f"%R~{p}champion", f"%R~{p}models", f"%R~{p}model:*"]
    writes = {
        "scorer": [f"~{p}ent:*", f"~{p}snaps:*", f"~{p}features:layout", *registry_read],
        "learner": [f"~{p}learned:*", f"~{p}models", f"~{p}model:*", f"~{p}champion",
                    f"~{p}champion:history", f"~{p}learner:checkpoint", f"%R~{p}challengers"],
        "monitor": [f"~{p}champion", f"~{p}champion:history", f"~{p}challengers",
                    f"~{p}monitor:memory", f"%R~{p}models", f"%R~{p}model:*",
                    f"%R~{p}learner:checkpoint"],
    }[stage]  # fmt: skip
    if spec.label_features:
        lab = f"{p}lab:"
        writes += {
            "scorer": [f"%R~{lab}ent:*", f"~{lab}features:layout"],
            "learner": [f"~{lab}ent:*", f"~{lab}snaps:*", f"~{lab}features:layout"],
            "monitor": [],
        }[stage]  # fmt: skip
    return ["resetkeys", "resetchannels", *writes, f"&{p}champion:moved",
            "-@all", "+@all", "-@dangerous"]  # fmt: skip
