"""Personal data in events: pseudonymised at intake, never passed on in clear.

The spec marks event fields as personal (``events.pii``), each with a policy:

- ``hash``: the value is replaced by a keyed HMAC-SHA256 of it (the first 16
  bytes, 32 hex characters), with the key from settings (``RIVERFLOW_PII_KEY``).
  The same value always gives the same token, so an entity's features, the
  label join and the partitioning still work on tokens; without the key a token
  cannot be tested against a guess (a plain hash of a card number can).
- ``drop``: the field is removed from the event.

The scorer applies it to every event right after validation, before the event
reaches the feature store, the model, a prediction or a log line. A refused
message goes to the dead letters scrubbed the same way: a JSON object with its
marked fields replaced, a payload that is not one withheld (only its length is
kept), and a message key that is a marked field's value replaced by its token.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import orjson

from riverflow.streams.contracts import Message

TOKEN_BYTES = 16
CACHE_MAX = 100_000  # values whose token is kept, so a busy entity is hashed once


class PiiPolicy(StrEnum):
    HASH = "hash"
    DROP = "drop"


class Pseudonymizer:
    """Applies the spec's ``events.pii`` policies with ``key``; ``key_field``: the
    field the events topic is keyed by (its message keys are tokenised too when it
    is marked)."""

    def __init__(
        self,
        policies: Mapping[str, PiiPolicy],
        key: bytes,
        key_field: str | None = None,
        key_id: str = "1",
    ) -> None:
        self.hashed = [name for name, p in policies.items() if p is PiiPolicy.HASH]
        self.dropped = [name for name, p in policies.items() if p is PiiPolicy.DROP]
        self.key = key
        self.key_id = key_id  # named in every prediction, so a rotation is visible
        self.key_marked = key_field is not None and key_field in policies
        self._tokens: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self.hashed or self.dropped)

    def token(self, value: str) -> str:
        """The stable, keyed token of ``value``."""
        token = self._tokens.get(value)
        if token is None:
            digest = hmac.digest(self.key, value.encode("utf-8", "surrogatepass"), "sha256")
            token = digest[:TOKEN_BYTES].hex()
            if len(self._tokens) >= CACHE_MAX:  # bounded: start again (a cache, not state)
                self._tokens.clear()
            self._tokens[value] = token
        return token

    def apply(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with its marked fields tokenised or removed (changed in place)."""
        for name in self.hashed:
            value = record.get(name)
            if value is not None:
                record[name] = self.token(value if isinstance(value, str) else str(value))
        for name in self.dropped:
            record.pop(name, None)
        return record

    def scrub(self, msg: Message) -> tuple[Message, str]:
        """A refused message as the dead letters may keep it (see the module doc), and
        what to add to the reason ("" when nothing was withheld)."""
        if not self:
            return msg, ""
        key = msg.key
        if self.key_marked and key is not None:
            key = self.token(key.decode("utf-8", "surrogateescape")).encode()
        value, note = msg.value, ""
        if value is not None:
            try:
                data = orjson.loads(value)
            except orjson.JSONDecodeError:
                data = None
            if isinstance(data, dict):
                value = orjson.dumps(self.apply(data))
            else:
                note = f" ({len(value)} bytes withheld: not a JSON object, may hold personal data)"
                value = None
        return msg._replace(key=key, value=value), note
