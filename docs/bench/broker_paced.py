"""The broker's CPU per request of a paced slate-like flow, on a fresh broker (not project code).

    python docs/bench/broker_paced.py [--rate 1000] [--seconds 20] [--warmup 8] [--fetch-wait-ms 0]

Starts a local stack's broker (as ``riverflow bench`` does) and runs, at ``--rate``
requests/s: the bench's producer (1 ms linger) sending a ~1 KB request to topic ``E``;
a relay process standing for the scorer (consume up to 500 with a 2 ms wait, produce
a ~7 KB ranked prediction per request to ``P`` with the scorer's producer settings,
commit asynchronously); and the bench's prediction reader on ``P``. After
``--warmup`` seconds it reads the CPU seconds of the broker, the relay and this
process over ``--seconds``, per request. No model, no Redis: what the broker costs
the flow alone. ``--fetch-wait-ms`` > 0 gives the relay's consumer
``fetch.min.bytes`` 64 KB and that ``fetch.wait.max.ms`` (fewer, fuller fetches).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer

from riverflow.settings import Settings
from riverflow.streams.kafka_io import ensure_topics, producer
from riverflow.tools.bench import ProcessUsage
from riverflow.tools.stack import local_stack


def prediction(i: int) -> bytes:
    """A ranked prediction of 20 items shaped as the recsys scorer's (~7 KB)."""
    rnd = random.Random(i)
    slate = [
        {"item": f"i{rnd.randrange(5000)}", "position": k, "score": rnd.random(),
         "shown": k < 5, "propensity": 1.0,
         "inputs": {"category": f"c{rnd.randrange(20)}", "quality": rnd.random()},
         "features": {"user_requests_1h": rnd.randrange(10),
                      "item_candidacy_24h": rnd.randrange(1000),
                      "user_category_candidates_24h": rnd.randrange(50),
                      "user_ctr_24h": rnd.random(), "item_ctr_24h": rnd.random(),
                      "user_category_ctr_7d": rnd.random(),
                      "user_category_click_recency_7d": rnd.random()}}
        for k in range(20)
    ]  # fmt: skip
    return orjson.dumps({"event_id": f"r{i}", "entity": "u1", "model": "recsys-fm",
                         "version": 3, "ts": 1.0, "slate": slate, "shown": 5})  # fmt: skip


def relay(bootstrap: str, fetch: dict[str, Any], stop: Any) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "relay",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "fetch.wait.max.ms": 100, **fetch})  # fmt: skip
    consumer.subscribe(["E"])
    prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1, "compression.type": "lz4"})
    predictions = [prediction(i) for i in range(200)]
    n = 0
    while not stop.is_set():
        msgs = consumer.consume(500, timeout=0.002)
        for m in msgs:
            prod.produce("P", predictions[n % 200], m.key())
            n += 1
        if msgs:
            prod.poll(0)
            consumer.commit(asynchronous=True)
    prod.flush(10)
    consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--fetch-wait-ms", type=int, default=0)
    args = parser.parse_args()
    fetch = {}
    if args.fetch_wait_ms:
        fetch = {"fetch.min.bytes": 65536, "fetch.wait.max.ms": args.fetch_wait_ms}
    settings = Settings(kafka_bootstrap="", redis_url="")
    with tempfile.TemporaryDirectory() as d, local_stack(settings, Path(d)) as ep:
        bootstrap = ep.kafka_bootstrap
        ensure_topics(bootstrap, ["E", "P"], partitions=3)
        stop = mp.Event()
        worker = mp.Process(target=relay, args=(bootstrap, fetch, stop))
        worker.start()
        prod = producer(bootstrap, **{"linger.ms": 1})
        reader = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader",
                           "auto.offset.reset": "latest", "enable.auto.commit": False,
                           "fetch.wait.max.ms": 100})  # fmt: skip
        reader.subscribe(["P"])
        request = orjson.dumps({"request_id": "r" * 10, "user_id": "u", "pad": "y" * 100,
                                "items": [{"item_id": f"i{k}", "category": "c",
                                           "quality": 0.5} for k in range(20)]})  # fmt: skip
        received = 0

        def paced(seconds: float) -> int:
            nonlocal received
            sent, start = 0, time.monotonic()
            while time.monotonic() < start + seconds:
                while time.monotonic() < start + sent / args.rate:
                    received += len(reader.consume(100, timeout=0.0005))
                prod.produce("E", request, f"u{sent % 97}".encode())
                prod.poll(0)
                sent += 1
            return sent

        paced(args.warmup)
        usage = {"broker": ProcessUsage(ep.pids["kafka"]), "relay": ProcessUsage(worker.pid or 0),
                 "bench": ProcessUsage(os.getpid())}  # fmt: skip
        cpu0 = {name: u.cpu_s() for name, u in usage.items()}
        got0, start = received, time.monotonic()
        sent = paced(args.seconds)
        elapsed = time.monotonic() - start
        print(json.dumps({
            "rate": args.rate, "warmup_s": args.warmup, "fetch_wait_ms": args.fetch_wait_ms,
            "sent_per_s": round(sent / elapsed),
            "received_per_s": round((received - got0) / elapsed),
            **{f"{name}_cpu_us": round((u.cpu_s() - cpu0[name]) / sent * 1e6)
               for name, u in usage.items()},
            "load": os.getloadavg()[0],
        }))  # fmt: skip
        stop.set()
        worker.join(20)
        if worker.is_alive():
            worker.terminate()
        prod.flush(5)
        reader.close()


if __name__ == "__main__":
    main()
