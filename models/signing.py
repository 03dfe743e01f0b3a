"""HMAC-signed bytes: we only read what we signed ourselves.

Model snapshots are signed pickles: unpickling runs code, so a blob whose
signature does not verify is refused before a single byte of it is read by
``pickle``. Documents of plain data (the learner checkpoint) are signed the same
way under another marker, which the MAC covers, so a signed document can never
be passed off as a signed pickle.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from typing import Any

from riverflow.models.errors import SignatureError

MAGIC = b"RFS1"  # a signed pickle
DOCUMENT_MAGIC = b"RFD1"  # signed bytes that are not a pickle
_DIGEST = hashlib.sha256


def sign(obj: Any, key: bytes) -> bytes:
    """``MAGIC + HMAC-SHA256(payload) + payload`` where payload is the pickle."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return MAGIC + hmac.new(key, payload, _DIGEST).digest() + payload


def verify_and_load(blob: bytes, key: bytes) -> Any:
    """Unpickle ``blob`` only if its signature verifies with ``key``."""
    payload = _verified(blob, key, MAGIC, b"", "model snapshot")
    return pickle.loads(payload)


def sign_bytes(payload: bytes, key: bytes) -> bytes:
    """``DOCUMENT_MAGIC + HMAC-SHA256(DOCUMENT_MAGIC + payload) + payload``."""
    return DOCUMENT_MAGIC + hmac.new(key, DOCUMENT_MAGIC + payload, _DIGEST).digest() + payload


def verify_bytes(blob: bytes, key: bytes, what: str) -> bytes:
    """The payload of ``blob`` signed by ``sign_bytes`` with ``key``; ``what`` names it in
    the error."""
    return _verified(blob, key, DOCUMENT_MAGIC, DOCUMENT_MAGIC, what)


def document_mac(payload: bytes, key: bytes) -> bytes:
    """The MAC ``sign_bytes`` puts before ``payload`` (for a signature kept apart from it)."""
    return hmac.new(key, DOCUMENT_MAGIC + payload, _DIGEST).digest()


def verify_mac(payload: bytes, mac: bytes, key: bytes, what: str) -> None:
    """Refuse ``payload`` unless ``mac`` is its ``document_mac`` under ``key``."""
    if not hmac.compare_digest(mac, document_mac(payload, key)):
        raise SignatureError(f"{what} signature does not verify (tampered or other key)")


def _verified(blob: bytes, key: bytes, magic: bytes, covered: bytes, what: str) -> bytes:
    size = _DIGEST().digest_size
    if len(blob) < len(magic) + size or not blob.startswith(magic):
        raise SignatureError(f"{what} is not signed by riverflow: refused")
    mac, payload = blob[len(magic) : len(magic) + size], blob[len(magic) + size :]
    if not hmac.compare_digest(mac, hmac.new(key, covered + payload, _DIGEST).digest()):
        raise SignatureError(f"{what} signature does not verify (tampered or other key)")
    return payload
