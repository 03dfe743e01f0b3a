"""Seeded synthetic streams with known drift points, one per example pipeline.

``fraud`` (``examples/fraud.yaml``), card transactions whose fraud pattern drifts:

Same seed, same stream, byte for byte. The fraud pattern switches at the
configured event positions (concept drift with known drift points):

- concept 0, *account takeover*: a stolen card makes a burst of large online
  purchases (electronics, jewelry) from abroad;
- concept 1, *card testing*: a stolen card makes a burst of tiny purchases of
  digital goods at home, on mobile.

Normal traffic is the same in both, so a model that learned concept 0 misses
concept 1 until it relearns. Labels (``is_fraud``) follow their event after a
fixed number of events, as delayed ground truth does.

``delivery`` (``examples/delivery.yaml``), food orders whose delivery time in
minutes (``delivery_minutes``, the label of a regression) drifts: it is the
restaurant's preparation time, longer the more orders its kitchen has in hand,
plus the ride, whose minutes per km jump at each drift point (rain: the roads
slow down and couriers ride slower) while the kitchens slow down too.

``history(name, n, seed)`` picks a stream by name; ``stream_for(spec)`` names
the one that fits a spec (by its label field).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

CATEGORIES = ["grocery", "fuel", "restaurant", "travel", "electronics", "jewelry", "digital"]
CATEGORY_WEIGHTS = [30, 15, 20, 5, 8, 2, 20]
COUNTRIES = ["FR", "DE", "ES", "IT", "NL", "GB", "US", "BR"]
CHANNELS = ["pos", "online", "mobile"]
BAD_KINDS = ("invalid_json", "wrong_type", "missing_field", "oversized", "not_finite")
T = TypeVar("T")


@dataclass(frozen=True)
class FraudStreamConfig:
    """Knobs of the synthetic stream; every field has a sane default."""

    seed: int = 7
    cards: int = 1000
    burst_rate: float = 0.006  # chance per event that a new card gets compromised
    drift_at: tuple[int, ...] = (5_000,)
    label_delay: int = 100  # a label follows its event by this many events
    # labels of the events at these positions [start, end) are flipped (a bad labelling job)
    flipped_labels: tuple[int, int] | None = None
    mean_gap_s: float = 1.0
    start_ts: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def concept_at(position: int, config: FraudStreamConfig) -> int:
    """Which fraud pattern is active at this event position (0 or 1)."""
    return sum(position >= d for d in config.drift_at) % 2


def transactions(n: int, config: FraudStreamConfig) -> Iterator[tuple[dict[str, Any], bool]]:
    """``n`` events with their hidden truth (is it fraud?)."""
    rng = random.Random(config.seed)
    home = {f"c{i:05d}": rng.choice(COUNTRIES[:6]) for i in range(config.cards)}
    cards = list(home)
    bursts: dict[str, int] = {}
    ts = config.start_ts
    for i in range(n):
        concept = concept_at(i, config)
        ts += rng.expovariate(1.0 / config.mean_gap_s)
        if rng.random() < config.burst_rate:
            bursts[rng.choice(cards)] = rng.randint(3, 6) if concept == 0 else rng.randint(5, 10)
        if bursts and rng.random() < 0.35:
            card = rng.choice(sorted(bursts))
            bursts[card] -= 1
            if bursts[card] == 0:
                del bursts[card]
            event = _fraud(rng, card, home[card], concept)
            fraud = True
        else:
            card = rng.choice(cards)
            event = _normal(rng, card, home[card])
            fraud = False
        event["event_id"] = f"e{config.seed}-{i:08d}"
        event["ts"] = round(ts, 3)
        yield event, fraud


def _normal(rng: random.Random, card: str, home: str) -> dict[str, Any]:
    return {
        "card_id": card,
        "amount": round(math.exp(rng.gauss(3.3, 0.9)), 2),
        "merchant": f"m{rng.randrange(300):04d}",
        "category": rng.choices(CATEGORIES, CATEGORY_WEIGHTS)[0],
        "country": home if rng.random() < 0.95 else rng.choice(COUNTRIES),
        "channel": rng.choice(CHANNELS),
    }


def _fraud(rng: random.Random, card: str, home: str, concept: int) -> dict[str, Any]:
    if concept == 0:
        abroad = [c for c in COUNTRIES if c != home]
        return {
            "card_id": card,
            "amount": round(math.exp(rng.gauss(6.0, 0.5)), 2),
            "merchant": f"m{rng.randrange(300, 320):04d}",
            "category": rng.choice(["electronics", "jewelry"]),
            "country": rng.choice(abroad),
            "channel": "online",
        }
    return {
        "card_id": card,
        "amount": round(rng.uniform(0.5, 5.0), 2),
        "merchant": f"m{rng.randrange(320, 340):04d}",
        "category": "digital",
        "country": home,
        "channel": "mobile",
    }


def with_labels(n: int, config: FraudStreamConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """Events and their labels in arrival order: ``("event", e)`` / ``("label", l)``."""
    waiting: deque[dict[str, Any]] = deque()
    flip = range(*config.flipped_labels) if config.flipped_labels else range(0)
    for i, (event, fraud) in enumerate(transactions(n, config)):
        yield "event", event
        if i in flip:
            fraud = not fraud
        waiting.append({"event_id": event["event_id"], "is_fraud": fraud})
        if len(waiting) > config.label_delay:
            yield "label", waiting.popleft()
    while waiting:
        yield "label", waiting.popleft()


def stamped_history(
    n: int, config: FraudStreamConfig | Iterable[tuple[str, dict[str, Any]]]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``with_labels`` (or the events and labels given), each label stamped (``ts``)
    with the time it arrives: the time of the event before it. What a history file
    of events and labels holds, for ``riverflow replay``."""
    last = 0.0
    records = with_labels(n, config) if isinstance(config, FraudStreamConfig) else config
    for kind, rec in records:
        if kind == "event":
            last = rec["ts"]
            yield kind, rec
        else:
            yield kind, {**rec, "ts": last}


def corrupt(
    event: dict[str, Any], kind: str, number: str = "amount", required: str = "card_id"
) -> bytes:
    """A bad payload of the given kind, built from a good event (``number``: a float
    field it spoils, ``required``: a field it leaves out)."""
    if kind == "invalid_json":
        return orjson.dumps(event)[:-7]
    if kind == "wrong_type":
        return orjson.dumps({**event, number: str(event[number])})
    if kind == "missing_field":
        return orjson.dumps({k: v for k, v in event.items() if k != required})
    if kind == "oversized":
        return orjson.dumps({**event, "note": "x" * 100_000})
    if kind == "not_finite":
        return orjson.dumps(event).replace(
            f'"{number}":{orjson.dumps(event[number]).decode()}'.encode(),
            f'"{number}":NaN'.encode(),
        )
    raise ValueError(f"unknown corruption kind {kind!r}; known: {', '.join(BAD_KINDS)}")


def paced(
    items: Iterable[T], rate: float, tick_s: float = 0.01, counts: Callable[[T], bool] | None = None
) -> Iterator[T]:
    """``items`` at ``rate`` per second, in bursts: the items due in one tick of ``tick_s``
    come together, with one sleep per tick, so that one Python process holds thousands
    per second (a sleep per item oversleeps). The schedule is absolute: a late tick is
    made up by the next ones. ``counts``: which items take a slot (e.g. events, with
    their labels riding along); default all."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, not {rate}")
    per_tick = rate * tick_s
    start = time.perf_counter()
    n = 0
    for item in items:
        if counts is None or counts(item):
            due = start + math.floor(n / per_tick) * tick_s
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            n += 1
        yield item


# -- delivery: a regression stream ------------------------------------------------

ZONES = ["centre", "north", "south", "east", "west"]


@dataclass(frozen=True)
class DeliveryStreamConfig:
    """Knobs of the synthetic delivery stream; every field has a sane default."""

    seed: int = 7
    restaurants: int = 60
    couriers: int = 150
    drift_at: tuple[int, ...] = (5_000,)
    label_delay: int = 100  # a label (the delivery time) follows its order by this many orders
    mean_gap_s: float = 2.0
    start_ts: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z


# per concept: minutes per km of the ride, and how much slower kitchens prepare
_RIDE_MIN_PER_KM = (2.5, 5.0)
_KITCHEN_SLOWDOWN = (1.0, 1.4)


def deliveries(n: int, config: DeliveryStreamConfig) -> Iterator[tuple[dict[str, Any], float]]:
    """``n`` orders with the minutes each delivery took."""
    rng = random.Random(config.seed)
    prep = {f"r{i:03d}": rng.uniform(8.0, 20.0) for i in range(config.restaurants)}
    zone = {r: rng.choice(ZONES) for r in prep}
    restaurants = list(prep)
    couriers = [f"k{i:04d}" for i in range(config.couriers)]
    pace = {k: rng.uniform(0.85, 1.2) for k in couriers}  # a courier's own speed factor
    recent: dict[str, deque[float]] = {r: deque() for r in restaurants}  # order times, 30 min
    ts = config.start_ts
    for i in range(n):
        concept = sum(i >= d for d in config.drift_at) % 2
        ts += rng.expovariate(1.0 / config.mean_gap_s)
        restaurant = rng.choice(restaurants)
        courier = rng.choice(couriers)
        orders = recent[restaurant]
        while orders and orders[0] < ts - 1800:
            orders.popleft()
        orders.append(ts)
        items = rng.randint(1, 6)
        distance = round(rng.uniform(0.3, 3.0) * rng.choice((1.0, 1.0, 2.0)), 2)
        kitchen = (prep[restaurant] + 0.8 * items + 1.5 * len(orders)) * _KITCHEN_SLOWDOWN[concept]
        ride = distance * _RIDE_MIN_PER_KM[concept] * pace[courier]
        minutes = max(5.0, kitchen + ride + rng.gauss(0.0, 2.0))
        event = {
            "event_id": f"d{config.seed}-{i:08d}",
            "restaurant_id": restaurant,
            "courier_id": courier,
            "zone": zone[restaurant],
            "distance_km": distance,
            "items": items,
            "ts": round(ts, 3),
        }
        yield event, round(minutes, 2)


def delivery_with_labels(
    n: int, config: DeliveryStreamConfig
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Orders and their delivery times in arrival order: ``("event", e)`` / ``("label", l)``."""
    waiting: deque[dict[str, Any]] = deque()
    for event, minutes in deliveries(n, config):
        yield "event", event
        waiting.append({"event_id": event["event_id"], "delivery_minutes": minutes})
        if len(waiting) > config.label_delay:
            yield "label", waiting.popleft()
    while waiting:
        yield "label", waiting.popleft()


STREAMS = ("fraud", "delivery")
_LABEL_FIELDS = {"is_fraud": "fraud", "delivery_minutes": "delivery"}


def stream_for(label_field: str, name: str | None = None) -> str:
    """The stream that fits a spec: ``name`` if given (one of ``STREAMS``), else the
    one whose label field the spec's is (fraud by default)."""
    if name is not None:
        if name not in STREAMS:
            raise ValueError(f"unknown stream {name!r}; known: {', '.join(STREAMS)}")
        return name
    return _LABEL_FIELDS.get(label_field, "fraud")


def dropping(
    records: Iterable[tuple[str, dict[str, Any]]], dropped: tuple[str, int, int] | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``records`` (events and labels), the events at positions [start, end) without
    the field ``dropped`` names: an upstream system that stopped sending it for a
    while (cleaning and data quality see it)."""
    position = 0
    for kind, rec in records:
        if kind == "event":
            if dropped is not None and dropped[1] <= position < dropped[2]:
                rec = {k: v for k, v in rec.items() if k != dropped[0]}
            position += 1
        yield kind, rec


def history(
    name: str,
    n: int,
    seed: int = 7,
    drift_at: tuple[int, ...] | None = None,
    dropped: tuple[str, int, int] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Events and labels of the stream ``name`` in arrival order (drifting halfway
    unless ``drift_at`` says otherwise; ``dropped``: see ``dropping``)."""
    drift = (n // 2,) if drift_at is None else drift_at
    if stream_for("", name) == "delivery":
        records = delivery_with_labels(n, DeliveryStreamConfig(seed=seed, drift_at=drift))
    else:
        records = with_labels(n, FraudStreamConfig(seed=seed, drift_at=drift))
    return dropping(records, dropped)
