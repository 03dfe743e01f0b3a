"""HMAC-signed pickles: we only unpickle bytes that we signed ourselves.

Unpickling runs code, so a blob whose signature does not verify is refused
before a single byte of it is read by ``pickle``.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from typing import Any

from riverflow.models.errors import SignatureError

MAGIC = b"RFS1"
_DIGEST = hashlib.sha256


def sign(obj: Any, key: bytes) -> bytes:
    """``MAGIC + HMAC-SHA256(payload) + payload`` where payload is the pickle."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return MAGIC + hmac.new(key, payload, _DIGEST).digest() + payload


def verify_and_load(blob: bytes, key: bytes) -> Any:
    """Unpickle ``blob`` only if its signature verifies with ``key``."""
    size = _DIGEST().digest_size
    if len(blob) < len(MAGIC) + size or not blob.startswith(MAGIC):
        raise SignatureError("model snapshot is not signed by riverflow: refused")
    mac, payload = blob[len(MAGIC) : len(MAGIC) + size], blob[len(MAGIC) + size :]
    if not hmac.compare_digest(mac, hmac.new(key, payload, _DIGEST).digest()):
        raise SignatureError("model snapshot signature does not verify (tampered or other key)")
    return pickle.loads(payload)
