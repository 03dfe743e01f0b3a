"""``riverflow``: demo, local stack, stages, produce, tail, features, the model registry,
the monitor's report.

Every command reads ``Settings`` (``RIVERFLOW_*`` environment variables); Kafka
and Redis addresses come from there or, when unset, from ``riverflow stack up``.
"""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError
from rich.console import Console

from riverflow.errors import RiverflowError
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, load_spec, shipped_example
from riverflow.tools.generator import STREAMS
from riverflow.tools.stack import Endpoints, stack_down, stack_status, stack_up

if TYPE_CHECKING:
    from riverflow.features.labelled import LabelFeatures
    from riverflow.models.registry import RedisRegistry
    from riverflow.streams.contracts import ModelEvent

MONITOR_PORT = 9403  # the monitor stage's status page, /status.json and /metrics

console = Console()
err_console = Console(stderr=True)


def endpoints(settings: Settings) -> Endpoints:
    """Kafka and Redis from the settings, else from the running ``stack up``."""
    kafka, redis_url = settings.kafka_bootstrap, settings.redis_url
    if not (kafka and redis_url):
        running = {s.name: s for s in stack_status(settings) if s.alive()}
        kafka = kafka or (running["kafka"].address if "kafka" in running else None)
        redis_url = redis_url or (running["redis"].address if "redis" in running else None)
    if not (kafka and redis_url):
        raise RiverflowError(
            "no Kafka/Redis: run `riverflow stack up`, or set RIVERFLOW_KAFKA_BOOTSTRAP "
            "and RIVERFLOW_REDIS_URL"
        )
    return Endpoints(kafka, redis_url)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.tools.demo import run_demo, summary

    spec = load_spec(args.spec or args.example or settings.spec)
    if spec.events.slate is not None:  # ranking requests: the simulated users' demo
        from riverflow.tools.demo_recsys import recsys_summary, run_recsys_demo

        # 200 users: each one's tastes are learned within the run, so the season
        # change halfway costs the ranking what it had learned, and it learns again
        slates = run_recsys_demo(spec, settings, requests=args.events or 30_000, seed=args.seed,
                                 window=1_000, world_users=200, world_items=500)  # fmt: skip
        console.print()
        console.print(recsys_summary(slates))
        return 0
    result = run_demo(spec, settings, events=args.events or 20_000, seed=args.seed,
                      scenario=args.scenario,
                      stream=args.stream)  # fmt: skip
    console.print()
    console.print(summary(result))
    return 0


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "up":
        spec_file = None
        if args.secure:
            given = Path(args.spec or settings.spec)
            found = given if given.exists() else shipped_example(str(given)) or given
            spec_file = found.resolve()
            load_spec(spec_file)  # a broken spec is named before anything starts
        with console.status("starting Kafka (KRaft) and redis-server..."):
            ep = stack_up(settings, secure_for=spec_file)
        if spec_file is not None:
            envdir = settings.cache_dir / "stack" / "env"
            console.print(
                f"secured for {load_spec(spec_file).name}: Kafka {ep.kafka_bootstrap} over "
                "SASL_SSL (a throwaway CA), ACLs and a Redis user per stage. Each identity's "
                f"settings: {envdir}/admin.env (you: `. {envdir}/admin.env`), "
                f"{envdir}/scorer.env, learner.env, monitor.env",
                soft_wrap=True,
            )
            return 0
        console.print(f"export RIVERFLOW_KAFKA_BOOTSTRAP={ep.kafka_bootstrap}")
        console.print(f"export RIVERFLOW_REDIS_URL={ep.redis_url}")
    elif args.action == "down":
        stopped = stack_down(settings)
        console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    else:
        servers = stack_status(settings)
        if not servers:
            console.print("no local stack (riverflow stack up starts one)")
            return 1
        for s in servers:
            state = "running" if s.alive() else "DEAD"
            kept = f"  ({s.durability})" if s.durability else ""
            console.print(
                f"{s.name:6} {state:8} {s.address}  pid {s.pid}  log {s.log}{kept}",
                soft_wrap=True,
            )
        return 0 if all(s.alive() for s in servers) else 1
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.kafka_runtime import run_stage

    # `kill -USR1 <pid>`: every thread's stack to stderr (the stage's log), for a stage
    # that seems stuck; it goes on running (docs/operations.md)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    spec = load_spec(args.spec or settings.spec)
    run_stage(args.stage, spec, settings, endpoints(settings))
    return 0


def _file_records(path: Path, topic: str) -> Iterator[tuple[str, bytes | None, bytes]]:
    with path.open("rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if line:
                yield topic, None, line


def _dropped_field(text: str) -> tuple[str, int, int]:
    """``FIELD:START:END`` of --drop-field."""
    name, _, span = text.partition(":")
    start, _, end = span.partition(":")
    try:
        first, last = int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD:START:END") from None
    if not name or not 0 <= first < last:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD:START:END, 0 <= START < END")
    return name, first, last


DROP_HELP = "events at positions [START, END) come without FIELD (a data-quality scenario)"


def _rates(text: str) -> tuple[int, ...]:
    """``--rates``: events per second, comma-separated, each at least 1."""
    rates = tuple(_count(r.strip()) for r in text.split(",") if r.strip())
    if not rates:
        raise argparse.ArgumentTypeError(f"{text!r}: no rate (e.g. 1000,5000)")
    return rates


def _seconds(text: str) -> float:
    """A duration in seconds: a finite number more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):  # (NaN too)
        raise argparse.ArgumentTypeError(f"{text}: more than 0 seconds")
    return value


def _hosts(text: str) -> tuple[str, ...]:
    """``--hosts``: faust, confluent, or both, comma-separated (none: neither)."""
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    unknown = [h for h in hosts if h not in ("faust", "confluent", "none")]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown)}: hosts are faust, confluent (comma-separated), or none"
        )
    return hosts


def _whole(text: str, least: int = 0) -> int:
    """A whole number, at least ``least``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value}: at least {least}")
    return value


def _count(text: str) -> int:
    """A number of events (or requests, labels...): at least 1 (0 used to run the default
    count, and a negative one an empty run)."""
    return _whole(text, 1)


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.tools.generator import history, stamped_history, stream_for

    args.out.mkdir(parents=True, exist_ok=True)
    name = stream_for("", args.stream)
    paths = {"event": args.out / "events.jsonl", "label": args.out / "labels.jsonl"}
    with paths["event"].open("wb") as events, paths["label"].open("wb") as labels:
        files = {"event": events, "label": labels}
        for kind, rec in stamped_history(
            args.events, history(name, args.events, args.seed, dropped=args.drop_field)
        ):
            files[kind].write(orjson.dumps(rec) + b"\n")
    console.print(f"wrote {paths['event']} and {paths['label']} ({args.events} {name} events, "
                  "the pattern switching halfway)")  # fmt: skip
    return 0


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.replay import replay

    spec = load_spec(args.spec or settings.spec)
    with console.status(f"replaying {args.events}..."):
        result = replay(spec, args.events, args.labels, args.out, settings, args.label_time,
                        args.batch_span)  # fmt: skip
    files = ", ".join(f"{name}.jsonl {n:,}" for name, n in sorted(result.written.items()))
    span = (result.last_ts or 0.0) - (result.first_ts or 0.0)
    console.print(
        f"replayed {result.events:,} events and {result.labels:,} labels "
        f"({span / 3600:.1f} h of event time) in {result.seconds:.1f} s into {args.out}: {files}",
        soft_wrap=True,
    )
    if result.unplaced:
        console.print(f"{result.unplaced:,} lines had no usable time: fed at the time of the "
                      "line before them (bad events are in dlq.jsonl with the reason)")  # fmt: skip
    if result.champion:
        console.print(f"champion at the end: {result.champion[0]} v{result.champion[1]}")
    return 0


def cmd_acls(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.security import acl_commands, stage_acls

    spec = load_spec(args.spec or settings.spec)
    stages = [args.stage] if args.stage != "all" else ["scorer", "learner", "monitor"]
    if args.redis:
        from riverflow.security import redis_acl_rules

        cluster = settings.redis_cluster or (settings.redis_url or "").startswith(
            ("redis+cluster://", "rediss+cluster://"))  # fmt: skip
        for stage in stages:
            rules = " ".join(f"'{r}'" for r in redis_acl_rules(spec, stage, cluster))
            print(f"ACL SETUSER {stage} on '>PASSWORD' {rules}")
        return 0
    acls = [a for stage in stages for a in stage_acls(spec, stage, args.principal or
            f"User:{stage}")]  # fmt: skip
    if not args.apply:
        print("\n".join(acl_commands(acls, settings.kafka_bootstrap or "BROKER:9092")))
        return 0
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from riverflow.streams.kafka_io import client_config

    admin = AdminClient(client_config(endpoints(settings).kafka_bootstrap))
    for binding, future in admin.create_acls(acls).items():
        try:
            future.result()
        except KafkaException as exc:
            raise RiverflowError(f"creating {binding}: {exc}") from None
    console.print(f"created {len(acls)} ACLs for {', '.join(stages)}")
    return 0


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.assembly import label_feature_store, pseudonymizer, redis_client, redis_store
    from riverflow.streams.contracts import Prediction
    from riverflow.streams.kafka_io import read_topic

    spec = load_spec(args.spec or settings.spec)
    field = args.field or spec.events.key
    plan, labelled = spec.feature_plan(), spec.label_plan()
    entities_of = [*plan.entities, *(labelled.tiles.entities if labelled else [])]
    if field not in {f for entity in entities_of for f in entity}:
        raise RiverflowError(f"{field!r} keys no feature of {spec.name}: nothing is kept per it")
    pii = pseudonymizer(spec, settings)
    stored = pii.token(args.value) if field in pii.hashed else args.value
    ep = endpoints(settings)
    event_ids: list[str] = []
    if field == spec.events.key:  # its events still in the replay window: predictions keyed by it
        for msg in read_topic(ep.kafka_bootstrap, spec.topics.predictions, idle_s=1.0,
                              since_s=settings.replay_window_s):  # fmt: skip
            if msg.key() == stored.encode():
                event_ids.append(Prediction.decode(msg.value()).event_id)
    client = redis_client(settings, ep.redis_url)
    entities, snapshots = redis_store(spec, settings, client).forget(field, stored, event_ids)
    # the label-fed windows too (rf:{ns}:lab:), alone and crossed; the global rate keeps
    # its counts
    labels = label_feature_store(spec, settings, client)
    entities += 0 if labels is None else labels.forget(field, stored)
    console.print(
        f"forgot {field} {args.value!r} in Redis: {entities} entity keys (its windows) and "
        f"{snapshots} snapshots of its last {len(event_ids)} events deleted. Kept until their "
        f"retention: its predictions on {spec.topics.predictions} and in the learner's index "
        f"(the label horizon, {settings.label_horizon_s / 86400:g} days), by token"
        + (" (the field is tokenised)" if field in pii.hashed else ""),
        soft_wrap=True,
    )
    return 0


def cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.kafka_runtime import ensure_pipeline_topics
    from riverflow.tools.generator import history, paced, stream_for

    if args.rate is not None and args.rate <= 0:
        raise RiverflowError(f"--rate {args.rate:g}: events per second must be positive")
    if not 0 <= args.skip <= args.events:
        raise RiverflowError(f"--skip {args.skip}: must be from 0 to --events ({args.events})")
    acks_wait = settings.outage_limit_s if args.acks_wait is None else args.acks_wait
    if acks_wait <= 0:
        raise RiverflowError(f"--acks-wait {acks_wait:g}: seconds must be positive")
    spec = load_spec(args.spec or settings.spec)
    topics = spec.topics
    ep = endpoints(settings)
    ensure_pipeline_topics(ep.kafka_bootstrap, spec, settings)
    records: Iterator[tuple[str, bytes | None, bytes]]
    if spec.events.slate is not None and not args.file:
        return _produce_requests(args, spec, ep, acks_wait)
    if args.file:
        records = _file_records(Path(args.file), args.topic or topics.events)
    else:
        name = stream_for(spec.label.field, args.stream)

        def generated() -> Iterator[tuple[str, bytes | None, bytes]]:
            skipped: set[str] = set()  # --skip: the first events, and their labels
            for kind, rec in history(name, args.events, args.seed, dropped=args.drop_field):
                if kind == "event":
                    if len(skipped) < args.skip:
                        skipped.add(rec["event_id"])
                        continue
                    yield topics.events, str(rec[spec.events.key]).encode(), orjson.dumps(rec)
                elif not args.no_labels and rec["event_id"] not in skipped:
                    yield topics.labels, rec["event_id"].encode(), orjson.dumps(rec)

        records = generated()
    if args.rate is not None:
        # a file's every line takes a slot; generated labels ride along with their events
        events_only = None if args.file else lambda r: r[0] == topics.events
        records = paced(records, args.rate, counts=events_only)
    n = _deliver(ep.kafka_bootstrap, records, acks_wait)
    console.print(f"produced {n:,} messages to {ep.kafka_bootstrap}")
    return 0


def _deliver(
    bootstrap: str, records: Iterator[tuple[str, bytes | None, bytes]], wait_s: float
) -> int:
    """Produce ``records``, waiting up to ``wait_s`` after the last for their acks
    (through a broker outage, and a new producer if the first is stuck after it), and
    saying so every 10 s meanwhile."""
    from riverflow.streams.kafka_io import Renewal, produce_all, producer, reaches_kafka

    said = [0.0]

    def waiting(left: int) -> None:
        if time.monotonic() - said[0] >= 10:
            said[0] = time.monotonic()
            err_console.print(f"{left:,} messages wait for their acks from {bootstrap} "
                              f"(up to {wait_s:g} s)")  # fmt: skip

    # a producer stuck after a broker restart (librdkafka #5430) is replaced
    renewal = Renewal(lambda: producer(bootstrap), lambda: reaches_kafka(bootstrap))
    return produce_all(producer(bootstrap), records, wait_s, waiting, renewal)


def _produce_requests(
    args: argparse.Namespace, spec: PipelineSpec, ep: Endpoints, acks_wait: float
) -> int:
    """A slate spec's ``produce``: ranking requests of the simulated world, and (unless
    ``--no-labels``) its users clicking what the pipeline shows them."""
    from riverflow.tools.generator import paced
    from riverflow.tools.recsys import RecsysConfig, RecsysWorld, SimulatedUsers, fits

    why = fits(spec)
    if why is not None:
        raise RiverflowError(f"riverflow produce generates requests of examples/recsys.yaml's "
                             f"shape, and {why}: give your own with --file")  # fmt: skip
    world = RecsysWorld(RecsysConfig(seed=args.seed, shown=spec.events.slate.shown))  # type: ignore[union-attr]
    users = None if args.no_labels else SimulatedUsers(ep.kafka_bootstrap, spec, world, args.seed)
    key = spec.events.key

    def generated() -> Iterator[tuple[str, bytes | None, bytes]]:
        # made as they are sent: memory does not grow with --events
        for request in itertools.islice(world.requests(args.events), args.skip, None):
            e = world.event(request)
            if users is not None:  # before it is sent: its prediction comes after
                users.expect(e["request_id"])
            yield spec.topics.events, str(e[key]).encode(), orjson.dumps(e)

    records = generated()
    if args.rate is not None:
        records = paced(records, args.rate)
    n = _deliver(ep.kafka_bootstrap, records, acks_wait)
    console.print(f"produced {n:,} requests to {ep.kafka_bootstrap}")
    if users is not None:
        done = users.wait(args.clicks_wait)
        why = (f"they stopped reading: {users.stopped}" if users.stopped is not None
               else f"after {args.clicks_wait:g} s: is the scorer running?")  # fmt: skip
        console.print(f"the simulated users saw {users.answered:,} rankings and clicked "
                      f"{users.clicks:,} items" + ("" if done else
                      f" ({len(users.waiting):,} requests unanswered {why})"))  # fmt: skip
        users.close()
        if not done:
            return 1
    return 0


def cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.streams.kafka_io import read_topic

    ep = endpoints(settings)
    shown = 0
    held: list[Any] | None = None if args.last is None else []  # the last ones, until the end

    def show(msg: Any) -> bool:
        """Print one message; False once ``--limit`` are printed."""
        nonlocal shown
        value = msg.value() or b""
        try:
            text = json.dumps(orjson.loads(value))
        except orjson.JSONDecodeError:
            text = repr(value[:200])
        # each line as it comes, into a pipe too (`riverflow tail -f t | grep ...`)
        print(f"{msg.partition()}:{msg.offset()} {text}", flush=args.follow)
        shown += 1
        return not args.limit or shown < args.limit

    def at_end() -> None:
        """The topic read to its end: its last ``--last`` messages, oldest first (by
        their Kafka timestamps, across partitions)."""
        nonlocal held
        if held is None:
            return
        ordered = sorted(held, key=lambda m: (m.timestamp()[1], m.partition(), m.offset()))
        held = None
        for msg in ordered[-args.last :]:
            if not show(msg):
                raise _TailDone

    reader = read_topic(ep.kafka_bootstrap, args.topic, follow=args.follow, last=args.last,
                        on_end=None if args.last is None else at_end)  # fmt: skip
    try:
        for msg in reader:
            if held is not None:
                held.append(msg)  # (at most --last of each partition)
            elif not show(msg):
                break
    except _TailDone:
        pass
    finally:
        reader.close()
    return 0


class _TailDone(Exception):
    """``riverflow tail`` printed its ``--limit``."""


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.tools.bench import BenchConfig, report, run_bench

    spec = load_spec(args.spec or settings.spec)
    given = {
        "events": args.events,
        "rates": args.rates,
        "rate_seconds": args.rate_seconds,
        "hosts": args.hosts,
        "hold_seconds": args.hold_seconds,
        "search_steps": args.search_steps,
        "guarantee": args.guarantee,
        "peers": args.peers,
        "slates": args.slates,
        "textbook_events": args.textbook_events,
        "drain_warmup": args.drain_warmup,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    config = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    result = run_bench(
        spec, config, settings, log=lambda line: err_console.print(f"[dim]{line}[/dim]")
    )
    console.print(report(result))
    Path(args.json).write_bytes(orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2))
    console.print(f"figures written to {args.json}")
    return 0


def cmd_soak(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile
    from contextlib import AbstractContextManager, ExitStack, nullcontext

    from riverflow.tools.soak import SoakConfig, report, run_soak
    from riverflow.tools.stack import local_stack

    spec = load_spec(args.spec or settings.spec)
    config = SoakConfig(
        minutes=args.minutes, rate=args.rate, labels_behind=args.labels_behind, seed=args.seed,
        warmup_s=args.warmup, drain_s=args.drain,
    )  # fmt: skip
    if config.rate <= 0 or config.minutes <= 0 or config.labels_behind < 0:
        raise RiverflowError("soak: --rate and --minutes must be positive, --labels-behind >= 0")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="riverflow-soak-"))

    def log(line: str) -> None:
        err_console.print(f"[dim]{line}[/dim]")

    servers: AbstractContextManager[Endpoints]
    with ExitStack() as held:
        try:
            servers = nullcontext(endpoints(settings))
        except RiverflowError:
            log("no running stack: starting Kafka and Redis for this run")
            # their data (GBs after 25 minutes at 1,500/s) goes when the run ends
            data = held.enter_context(tempfile.TemporaryDirectory(prefix="riverflow-soak-"))
            servers = local_stack(settings, Path(data))
        ep = held.enter_context(servers)
        result = run_soak(spec, config, settings, ep, workdir, log=log)
    console.print(report(result))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2))
        console.print(f"figures written to {args.json}")
    return 1 if args.check and not result.passed else 0


def cmd_drift_eval(args: argparse.Namespace, settings: Settings) -> int:
    from rich.table import Table

    from riverflow.tools.drift_eval import RUNS, fmt, run_drift_eval
    from riverflow.tools.drift_streams import STREAMS

    runs = RUNS[1:] if args.monitored_only else RUNS
    streams = tuple(args.stream or STREAMS)
    result = run_drift_eval(streams, args.events, args.every, args.seed, runs,
                            log=lambda line: err_console.print(f"[dim]{line}[/dim]"))  # fmt: skip
    table = Table(title=f"decision quality: {args.events:,} events, a change every "
                        f"{args.every:,}, seed {args.seed}")  # fmt: skip
    cols = ("stream", "detector", "recall (detectable)", "mean delay", "false / 100k",
            "promote / rollback outside drift", "on stationary", "served accuracy")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col in cols[:2] else "right")
    for r in result["streams"]:
        without, with_ = r.get("without_monitor"), r.get("with_monitor")
        rows = []
        if without:
            rows.append(("River alone", without["river_alone"], without, None))
        if with_:
            rows += [("champion", with_["champion_alarms"], with_, with_),
                     ("all candidates", with_["all_alarms"], with_, None)]  # fmt: skip
        for label, f, run, decided in rows:
            recall = f"{fmt(f['recall'], '.2f')} ({f['detected']}/{f['detectable']})"
            if f["undetectable"]:
                recall += f" +{f['undetectable']} undetectable"
            table.add_row(
                r["stream"], label, recall, fmt(f["mean_delay"], ".0f"),
                f"{f['false_per_100k']:.1f}",
                f"{decided['promote_outside']} / {decided['rollback_outside']}" if decided else "",
                f"{decided['promote_stationary']} / {decided['rollback_stationary']}"
                if decided else "",
                f"{run['accuracy']:.4f}" if label != "all candidates" else "",
            )  # fmt: skip
    console.print(table)
    console.print(f"peak RSS {result['peak_rss_mb']:,.0f} MB")
    Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


def cmd_recovery_eval(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.tools.drift_eval import RUNS, evaluate_stream

    runs = RUNS[1:] if args.monitored_only else RUNS
    result = evaluate_stream(
        args.stream, args.events, args.every, args.seed, runs=runs, twin=args.twin,
        log=lambda line: err_console.print(f"[dim]{line}[/dim]"),
    )  # fmt: skip
    Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    if "recovery_ratio" not in result:  # one run, or no drift to recover from
        return 0
    without, with_ = result["without_monitor"], result["with_monitor"]
    console.print(
        f"recovery to within 2 points after each drift: {without['mean_recovery']:,.0f} events "
        f"without the monitor, {with_['mean_recovery']:,.0f} with "
        f"(x{result['recovery_ratio']:.2f}); served accuracy {without['accuracy']:.4f} "
        f"without, {with_['accuracy']:.4f} with"
    )
    return 0


def _registry(
    args: argparse.Namespace, settings: Settings
) -> tuple[PipelineSpec, RedisRegistry, Endpoints]:
    from riverflow.assembly import redis_client, signing_key
    from riverflow.models.registry import RedisRegistry

    spec = load_spec(args.spec or settings.spec)
    ep = endpoints(settings)
    client = redis_client(settings, ep.redis_url)
    return spec, RedisRegistry(client, spec.name, signing_key(settings)), ep


def _model_event(ep: Endpoints, topic: str, event: ModelEvent) -> None:
    """Append to ``{ns}.model-events`` (acknowledged before the command returns)."""
    from riverflow.streams.kafka_io import ensure_topics, produce_all, producer

    ensure_topics(ep.kafka_bootstrap, [topic], Settings().partitions)
    produce_all(producer(ep.kafka_bootstrap), [(topic, event.model.encode(), event.encode())])


def _human_size(size: int) -> str:
    """A model version's size for a person: ``"2.2 KB"``, ``"5.02 MB"``."""
    return f"{size / 2**10:.1f} KB" if size < 2**20 else f"{size / 2**20:.2f} MB"


def _version(registry: RedisRegistry, args: argparse.Namespace) -> int:
    """The version named on the command line, else the model's latest."""
    version: int | None = args.version or registry.latest(args.name)
    if version is None:
        raise RiverflowError(f"model {args.name!r} has no versions")
    return version


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.models.registry import ChampionPointer
    from riverflow.streams.contracts import ModelEvent

    spec, registry, ep = _registry(args, settings)
    champion = registry.champion()
    if args.action == "list":
        served = champion or ChampionPointer(spec.models.champion_spec.name, 0)
        console.print(f"champion: {served}" + ("" if champion else " (fresh, nothing published)"))
        names = sorted({*registry.names(), *(c.name for c in spec.models.candidates)})
        for name in names:
            for v in registry.versions(name)[-args.last :]:
                meta = registry.meta(name, v)
                mark = "*" if ChampionPointer(name, v) == champion else " "
                metrics = meta.get("metrics", {})
                auc = metrics.get("roc_auc")
                size = meta.get("bytes")  # (versions published before it was recorded: -)
                seen, own = meta.get("labels_seen", "-"), metrics.get("labels")
                # a challenger started later has learned fewer than the learner has seen
                if own is not None and isinstance(seen, int) and own < seen:
                    seen = f"{seen} ({int(own)} its own)"
                console.print(
                    f"{mark} {name} v{v}  labels {seen}  "
                    # (``or 0.0``: a fresh model's -0.0 printed as "-0.0000")
                    f"roc_auc {'-' if auc is None else f'{auc or 0.0:.4f}'}  "
                    f"size {'-' if size is None else _human_size(size)}  "
                    f"parent {meta.get('parent', '-')}",
                    soft_wrap=True,  # a line a version, however narrow the terminal (grep)
                )
        for move in registry.history()[-args.last :]:
            console.print(
                f"  {move.kind:8} -> {move.to}  (from {move.previous})  {move.reason}",
                soft_wrap=True,
            )
        return 0
    if args.action == "show":
        version = _version(registry, args)
        print(json.dumps(registry.meta(args.name, version), indent=2, sort_keys=True))
        return 0
    if args.action == "export":
        version = _version(registry, args)
        Path(args.output).write_bytes(registry.export(args.name, version))
        console.print(f"exported {args.name} v{version} to {args.output}")
        return 0
    if args.action == "import":
        imported = registry.import_(Path(args.file).read_bytes())
        event = ModelEvent(kind="imported", model=imported.name, version=imported.version)
        _model_event(ep, spec.topics.model_events, event)
        console.print(f"imported {imported.name} v{imported.version}")
        if not imported.meta["imported_from"]["meta_verified"]:
            err_console.print(
                "[yellow]warning:[/yellow] an old export (riverflow-model/1): its model is "
                "signed, its metadata (labels_seen, metrics) is not and was kept aside as "
                "unverified; re-export it with this riverflow to carry it verified"
            )
        return 0
    if args.action == "promote":
        version = _version(registry, args)
        move = registry.promote(ChampionPointer(args.name, version), reason=args.reason)
    else:
        target = registry.rollback_target()
        if target is None:
            raise RiverflowError(f"nothing to roll back to (champion: {champion})")
        move = registry.promote(target, kind="rollback", reason=args.reason)
    _model_event(ep, spec.topics.model_events, move.as_event())
    console.print(f"{move.kind}: champion {move.previous} -> {move.to}")
    return 0


def _models_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="the model registry: versions and the champion")
    actions = models.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spec", type=Path)
    ls = actions.add_parser("list", parents=[common], help="versions, champion, pointer moves")
    ls.add_argument("--last", type=int, default=10, help="last N versions per model and moves")
    show = actions.add_parser("show", parents=[common], help="a version's metadata (JSON)")
    promote = actions.add_parser("promote", parents=[common], help="point the champion at it")
    export = actions.add_parser("export", parents=[common], help="write a version to a file")
    for p in (show, promote, export):
        p.add_argument("name")
        p.add_argument("version", type=int, nargs="?", help="default: the latest")
    export.add_argument("-o", "--output", required=True)
    rollback = actions.add_parser(
        "rollback", parents=[common], help="back to the champion before the last move"
    )
    for p in (promote, rollback):
        p.add_argument("--reason", default="", help="recorded in the history and model-events")
    imp = actions.add_parser("import", parents=[common], help="store an exported version")
    imp.add_argument("file")
    models.set_defaults(func=cmd_models)


def _redis_url(settings: Settings) -> str | None:
    """Redis from the settings, else from the running ``stack up``."""
    if settings.redis_url:
        return settings.redis_url
    running = {s.name: s for s in stack_status(settings) if s.alive()}
    return running["redis"].address if "redis" in running else None


def cmd_features(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.assembly import label_feature_store, pseudonymizer, redis_client, redis_store

    spec = load_spec(args.spec or settings.spec)
    if args.action == "bench":
        return _features_bench(args, settings, spec)
    if args.action == "join-bench":
        from riverflow.tools.bench_join import run_join_bench

        r = run_join_bench(spec, args.events)
        console.print(
            f"label join, {r.events:,} scored events ({r.prediction_bytes:.0f} B a prediction): "
            f"{r.disk_bytes_per_event:.0f} B each on the learner's disk (RocksDB, compacted); "
            f"CPU per event: index {r.index_us:.1f} us, lookup {r.lookup_us:.1f} us, "
            f"forget {r.forget_us:.1f} us",
            soft_wrap=True,
        )
        return 0
    url = _redis_url(settings)
    if args.action == "reset":
        if not args.yes:
            raise RiverflowError(
                "features reset deletes every entity's windows of this pipeline "
                f"({spec.name}); stop every scorer first, then run it with --yes"
            )
        if not url:
            raise RiverflowError("no Redis: run `riverflow stack up` or set RIVERFLOW_REDIS_URL")
        client = redis_client(settings, url)
        deleted = redis_store(spec, settings, client).reset()
        labels = label_feature_store(spec, settings, client)
        deleted += 0 if labels is None else labels.reset()  # rf:{ns}:lab:
        console.print(f"deleted {deleted:,} entity keys of {spec.name} and their layout")
        return 0
    if args.entity is None:
        raise RiverflowError("features get: which entity? e.g. riverflow features get c00042")
    if not url:
        raise RiverflowError("no Redis: run `riverflow stack up` or set RIVERFLOW_REDIS_URL")
    slate = spec.events.slate
    known = {*spec.events.fields, *(slate.fields if slate is not None else ())}
    fields = {spec.events.key: args.entity}
    for pair in args.with_:
        name, sep, value = pair.partition("=")
        if not sep or name not in known:
            raise RiverflowError(
                f"--with {pair!r}: use FIELD=VALUE with an event field"
                + (" or a candidate's (events.slate.fields)" if slate is not None else "")
            )
        fields[name] = value
    pseudonymizer(spec, settings).apply(fields)  # stored under the tokens of marked fields
    client = redis_client(settings, url)
    store = redis_store(spec, settings, client)
    values = store.read(spec.feature_plan().entity_keys(fields), at=args.at)
    labels = label_feature_store(spec, settings, client)
    if labels is not None:
        values |= _label_fed(labels, spec.events.key, fields, args.at)
    print(json.dumps(values, indent=2))
    return 0


def _label_fed(
    labels: LabelFeatures, key: str, fields: dict[str, Any], at: float | None
) -> dict[str, float]:
    """The label-fed features (``source: labels``) whose entities ``fields`` name, as
    the scorer reads them (``LabelFeatures.read``) at event time ``at``, by default
    now (what a request now is served). The others are left out, with a note of the
    ``--with`` they need: the field not given would read as a new entity (the prior)."""
    needs = {f.name: f.entity_fields(key) for f in labels.plan.features}
    absent = {n for entity in needs.values() for n in entity if n not in fields}
    # a read names every entity of the plan: the absent ones are read and not shown
    read = labels.read([{**fields, **dict.fromkeys(absent, "")}], time.time() if at is None else at)
    out = {name: read[0][name] for name, entity in needs.items() if absent.isdisjoint(entity)}
    for name, entity in needs.items():
        if name not in out:
            given = " ".join(f"--with {n}=..." for n in entity if n in absent)
            err_console.print(
                f"{name} (label-fed, per {'+'.join(entity)}): give {given}", soft_wrap=True
            )
    return out


def _features_bench(args: argparse.Namespace, settings: Settings, spec: PipelineSpec) -> int:
    from riverflow.assembly import redis_client
    from riverflow.tools.bench_features import local_redis, run_bench

    with local_redis(_redis_url(settings)) as url:
        client = redis_client(settings, url)
        console.print(f"Redis {url.split('@')[-1]}, {args.events:,} events per run")
        for size in args.batch or [100, 1000]:
            for path in args.path or ["in-process", "server"]:
                r = run_bench(client, spec, args.events, size, path=path)
                console.print(
                    f"{path:>10} batch {r.batch_size:>5}: {r.events_per_s:>9,.0f} events/s = "
                    f"{r.feature_values_per_s:>10,.0f} feature updates+reads/s ({r.features} "
                    f"features); per batch p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms "
                    f"({r.batches} batches); CPU per batch: client {r.client_cpu_ms:.2f} ms, "
                    f"redis-server {r.redis_cpu_ms:.2f} ms",
                    soft_wrap=True,
                )
    return 0


def _fetch_view(url: str) -> bytes:
    import urllib.error
    import urllib.request

    address = url.rstrip("/") + "/status.json"
    try:
        with urllib.request.urlopen(address, timeout=10) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        raise RiverflowError(f"{address}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RiverflowError(
            f"no monitor at {url} ({reason}): start one with `riverflow run monitor`, "
            "or pass a saved view with --state FILE.json"
        ) from None


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from riverflow.monitors.plot import render_png
    from riverflow.monitors.status import render_html
    from riverflow.monitors.view import parse_view

    if args.state:
        try:
            raw = args.state.read_bytes()
        except OSError as exc:
            raise RiverflowError(f"cannot read {args.state}: {exc.strerror}") from None
        view = parse_view(raw, source=str(args.state))
    else:
        view = parse_view(_fetch_view(args.url), source=f"{args.url}/status.json")
    args.html.write_text(render_html(view, live=False), encoding="utf-8")
    render_png(view, args.png)
    console.print(f"wrote {args.html} and {args.png} ({view.pipeline}, "
                  f"{len(view.candidates)} candidates, {len(view.markers)} markers)")  # fmt: skip
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="riverflow", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a pipeline (fraud by default) on the embedded runtime")
    demo.add_argument(
        "--events",
        type=_count,
        help="events (default 20,000), or requests of a slate spec (30,000)",
    )
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--spec", type=Path)
    demo.add_argument(
        "--example", choices=["fraud", "delivery", "recsys"],
        help="a shipped example's spec (recsys: ranking requests, simulated users' clicks)",
    )  # fmt: skip
    demo.add_argument(
        "--scenario", choices=["drift", "labels", "quality"], default="drift",
        help="drift: the fraud pattern switches halfway (drift alarm, fresh challenger, "
        "promotion); labels: a burst of flipped labels (rollback); quality: the amount "
        "goes missing for a fifth of the stream (schema change, imputation)",
    )  # fmt: skip
    demo.add_argument("--stream", choices=STREAMS, help="generated stream (default: fits --spec)")
    demo.set_defaults(func=cmd_demo)

    forget = sub.add_parser(
        "forget", help="erase an entity's features and snapshots from Redis (right to erasure)"
    )
    forget.add_argument("value", help="the entity's raw value (a card id)")
    forget.add_argument("--field", help="the entity field (default: the events' key)")
    forget.add_argument("--spec", type=Path)
    forget.set_defaults(func=cmd_forget)

    acls = sub.add_parser(
        "acls", help="what a stage's Kafka principal (kafka-acls.sh) or Redis user needs"
    )
    acls.add_argument("stage", choices=["scorer", "learner", "monitor", "all"])
    acls.add_argument("--principal", help="default: User:<stage>")
    acls.add_argument(
        "--apply", action="store_true",
        help="create them on the cluster (log in as an admin: RIVERFLOW_KAFKA_*)",
    )  # fmt: skip
    acls.add_argument(
        "--redis", action="store_true",
        help="the stage's Redis user instead (ACL SETUSER, for redis-cli)",
    )  # fmt: skip
    acls.add_argument("--spec", type=Path)
    acls.set_defaults(func=cmd_acls)

    replay = sub.add_parser(
        "replay", help="backtest: the pipeline over a file of history, deterministically"
    )
    replay.add_argument("--events", type=Path, required=True, help="events, JSON lines")
    replay.add_argument("--labels", type=Path, help="labels, JSON lines, each with a time")
    replay.add_argument("--out", type=Path, required=True, help="directory for the outputs")
    replay.add_argument("--label-time", default="ts", help="the labels' time field (epoch s)")
    replay.add_argument(
        "--batch-span", type=float, default=1.0,
        help="the most event time (s) one batch spans: each record is processed at most "
        "this long after it came",
    )  # fmt: skip
    replay.add_argument("--spec", type=Path)
    replay.set_defaults(func=cmd_replay)

    generate = sub.add_parser("generate", help="write a history of events and labels (for replay)")
    generate.add_argument("--events", type=_count, default=20_000)
    generate.add_argument("--seed", type=int, default=7)
    generate.add_argument(
        "--stream", choices=STREAMS, default="fraud",
        help="fraud (examples/fraud.yaml) or delivery (examples/delivery.yaml)",
    )  # fmt: skip
    generate.add_argument("--out", type=Path, required=True, help="directory for the files")
    generate.add_argument("--drop-field", type=_dropped_field, metavar="FIELD:START:END",
                          help=DROP_HELP)  # fmt: skip
    generate.set_defaults(func=cmd_generate)

    stack = sub.add_parser("stack", help="local Kafka + Redis without Docker")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument(
        "--secure", action="store_true",
        help="up: TLS + SASL logins, ACLs and a Redis user per stage for --spec's pipeline",
    )  # fmt: skip
    stack.add_argument("--spec", type=Path)
    stack.set_defaults(func=cmd_stack)

    run = sub.add_parser("run", help="run a stage on Kafka (until Ctrl-C / SIGTERM)")
    run.add_argument("stage", choices=["scorer", "learner", "monitor"])
    run.add_argument("--spec", type=Path)
    run.set_defaults(func=cmd_run)

    produce = sub.add_parser(
        "produce", help="produce generated events + labels, or a JSON-lines file"
    )
    produce.add_argument("--events", type=_count, default=10_000)
    produce.add_argument("--seed", type=int, default=7)
    produce.add_argument(
        "--skip", type=int, default=0,
        help="leave out the first SKIP of the --events generated events and their labels "
        "(the rest of the same stream: resumes a run stopped after SKIP)",
    )  # fmt: skip
    produce.add_argument("--no-labels", action="store_true")
    produce.add_argument("--drop-field", type=_dropped_field, metavar="FIELD:START:END",
                         help=DROP_HELP)  # fmt: skip
    produce.add_argument("--file", help="JSON-lines file, one message per line")
    produce.add_argument("--topic", help="topic for --file (default: the events topic)")
    produce.add_argument(
        "--rate", type=float, help="events per second, paced (default: as fast as possible)"
    )
    produce.add_argument("--spec", type=Path)
    produce.add_argument(
        "--acks-wait", type=float, metavar="SECONDS",
        help="how long to wait for the broker's acks after the last message, e.g. "
        "through a broker restart (default: OUTAGE_LIMIT_S, 120 s); then it fails "
        "naming how many were not acknowledged",
    )  # fmt: skip
    produce.add_argument(
        "--clicks-wait", type=float, default=120.0,
        help="slate specs: how long the simulated users wait for the last ranking (s)",
    )  # fmt: skip
    produce.add_argument(
        "--stream", choices=STREAMS, help="generated stream (default: fits --spec)"
    )
    produce.set_defaults(func=cmd_produce)

    tail = sub.add_parser(
        "tail", help="print a topic's messages: from the beginning, or its last N (--last)"
    )
    tail.add_argument("topic")
    tail.add_argument("-f", "--follow", action="store_true",
                      help="go on printing what comes, until interrupted")  # fmt: skip
    tail.add_argument("-n", "--limit", type=int, default=0, help="stop after printing this many")
    tail.add_argument("-l", "--last", type=_count,
                      help="start from the topic's last N messages (oldest first, across "
                           "partitions by their timestamps)")  # fmt: skip
    tail.set_defaults(func=cmd_tail)
    bench = sub.add_parser("bench", help="measure limit, embedded and Kafka runtimes (one run)")
    bench.add_argument("--events", type=_count, help="limit, embedded, drain (default 100,000)")
    bench.add_argument(
        "--rates", type=_rates, help="offered rates for latency, per s (default 1000,5000)"
    )
    bench.add_argument("--rate-seconds", type=_seconds, help="each latency point (default 8)")
    bench.add_argument("--hold-seconds", type=_seconds, help="each rate the search tries (12)")
    bench.add_argument("--search-steps", type=_whole, help="bisections of the search (4)")
    bench.add_argument("--quick", action="store_true", help="shorter: fewer events and holds")
    bench.add_argument(
        "--drain-warmup", type=_whole,
        help="events a scorer drains before its timed drain (default: the spec's longest "
        "window of event time, at most 200,000; 0: none)",
    )  # fmt: skip
    bench.add_argument("--hosts", type=_hosts, default=("faust", "confluent"))
    bench.add_argument(
        "--guarantee", choices=["at_least_once", "exactly_once", "both"],
        help="the confluent scorer's drain under each (both: also exactly once, then at "
        "least once again; default at_least_once)",
    )  # fmt: skip
    bench.add_argument(
        "--peers", action=argparse.BooleanOptionalAction,
        help="the bare and textbook Faust agent rows, drained on the same broker (default: on)",
    )  # fmt: skip
    bench.add_argument(
        "--textbook-events", type=_count, help="the textbook agent's drain (default 5,000: ~10 s)"
    )
    bench.add_argument(
        "--slates", action=argparse.BooleanOptionalAction,
        help="the recommendation row: the scorer on examples/recsys.yaml, slates of 20 "
        "(requests/s, items/s, latency per request at 1,000 requests/s; default: on)",
    )  # fmt: skip
    bench.add_argument("--json", default="bench-results.json")
    bench.add_argument("--spec", type=Path)
    bench.set_defaults(func=cmd_bench)

    soak = sub.add_parser(
        "soak", help="scorer, learner and monitor under steady load: gaps, lag, memory, counts"
    )
    soak.add_argument("--minutes", type=float, default=25.0)
    soak.add_argument("--rate", type=float, default=1500.0, help="events per second, paced")
    soak.add_argument("--labels-behind", type=int, default=400,
                      help="a label follows its event by this many events")  # fmt: skip
    soak.add_argument("--warmup", type=float, help="seconds not judged (default: 1/4, <= 60)")
    soak.add_argument("--drain", type=float, default=60.0,
                      help="seconds to wait after the last event for what is missing")  # fmt: skip
    soak.add_argument("--seed", type=int, default=7)
    soak.add_argument("--json", help="write every figure to this file")
    soak.add_argument("--check", action="store_true", help="exit 1 when a target failed")
    soak.add_argument("--workdir", type=Path, help="stage logs (default: a new temp folder)")
    soak.add_argument("--spec", type=Path)
    soak.set_defaults(func=cmd_soak)

    # drift_streams.STREAMS, not imported: it would load River for every command
    streams = ("sea", "sea-gradual", "agrawal", "agrawal-all")
    drift = sub.add_parser(
        "drift-eval",
        help="the monitor's alarms and decisions on synthetic drift streams, with and without it",
    )
    drift.add_argument("--stream", action="append", choices=streams,
                       help="repeatable; default all four")  # fmt: skip
    drift.add_argument("--events", type=_count, default=200_000)
    drift.add_argument("--every", type=_count, default=20_000, help="events between drifts")
    drift.add_argument("--seed", type=int, default=7)
    drift.add_argument(
        "--monitored-only", action="store_true", help="skip the run without the monitor"
    )
    drift.add_argument("--json", default="drift-eval.json")
    drift.set_defaults(func=cmd_drift_eval)

    recovery = sub.add_parser(
        "recovery-eval",
        help="the whole pipeline on abrupt drifts, with the monitor's policies and without",
    )
    recovery.add_argument("--events", type=_count, default=200_000)
    recovery.add_argument("--every", type=_count, default=25_000, help="events between drifts")
    recovery.add_argument("--seed", type=int, default=42)
    recovery.add_argument("--stream", choices=streams, default="agrawal")
    recovery.add_argument(
        "--monitored-only", action="store_true", help="skip the run without the monitor"
    )
    recovery.add_argument(
        "--twin", action="store_true", help="a second, about as good tree as a challenger"
    )
    recovery.add_argument("--json", default="recovery-eval.json")
    recovery.set_defaults(func=cmd_recovery_eval)

    _models_parser(sub)

    report = sub.add_parser(
        "report", help="the status page as a self-contained HTML file and a PNG plot"
    )
    source = report.add_mutually_exclusive_group()
    source.add_argument("--url", default=f"http://127.0.0.1:{MONITOR_PORT}",
                        help="a running monitor (default: %(default)s)")  # fmt: skip
    source.add_argument("--state", type=Path, help="a saved view (the monitor's status.json)")
    report.add_argument("--html", type=Path, default=Path("report.html"))
    report.add_argument("--png", type=Path, default=Path("report.png"))
    report.set_defaults(func=cmd_report)

    features = sub.add_parser("features", help="online feature values in Redis")
    features.add_argument("action", choices=["get", "reset", "bench", "join-bench"])
    features.add_argument(
        "entity", nargs="?", help="get: value of the event key (a card id, a user id)"
    )
    features.add_argument(
        "--with", dest="with_", action="append", default=[], metavar="FIELD=VALUE",
        help="another entity's key, for features kept per merchant, card+merchant, ...",
    )  # fmt: skip
    features.add_argument(
        "--at", type=float,
        help="event time windows end at (default: the entity's newest event; label-fed "
        "features: now)",
    )  # fmt: skip
    features.add_argument(
        "--events", type=_count, default=50_000, help="bench, join-bench: events per run"
    )
    features.add_argument(
        "--batch", type=_count, action="append", help="bench: batch size (default: 100 and 1000)"
    )
    features.add_argument(
        "--path", action="append", choices=["in-process", "server"],
        help="bench: where the store computes (default: both, one after the other)",
    )  # fmt: skip
    features.add_argument(
        "--yes", action="store_true",
        help="reset: delete the pipeline's stored entity state (stop every scorer first)",
    )  # fmt: skip
    features.add_argument("--spec", type=Path)
    features.set_defaults(func=cmd_features)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        settings = Settings()
    except ValidationError as exc:  # a RIVERFLOW_* variable that does not parse
        for e in exc.errors(include_url=False):
            name = "RIVERFLOW_" + "_".join(str(p) for p in e["loc"]).upper()
            where = f"{name}: " if e["loc"] else "settings: "  # a rule across settings
            err_console.print(f"[red]error:[/red] {where}{e['msg']}")
        return 2
    from riverflow.assembly import kafka_security
    from riverflow.streams.kafka_io import use_security

    use_security(kafka_security(settings))  # every Kafka client this process makes
    try:
        return int(args.func(args, settings))
    except RiverflowError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
