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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from riverflow.models.errors import SignatureError

MAGIC = b"RFS1"  # a signed pickle, before key ids (verified with every key of the ring)
DOCUMENT_MAGIC = b"RFD1"  # signed bytes that are not a pickle, before key ids
KEYED_MAGIC = b"RFS2"  # a signed pickle naming the id of the key that signed it
KEYED_DOCUMENT_MAGIC = b"RFD2"
_DIGEST = hashlib.sha256


@dataclass(frozen=True)
class Keyring:
    """One key that signs (``key_id``, ``key``) and the older ones that still verify
    (``older``: id -> key), so the signing key can be rotated: what the old key
    signed stays readable while it is kept in the ring, and is refused once it is
    dropped. Each signature names the id of its key (``KEYED_MAGIC``)."""

    key_id: str
    key: bytes
    older: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < len(self.key_id.encode()) < 256:
            raise ValueError(f"key id {self.key_id!r}: 1 to 255 bytes")

    def lookup(self, key_id: str, what: str) -> bytes:
        if key_id == self.key_id:
            return self.key
        if key_id in self.older:
            return self.older[key_id]
        raise SignatureError(
            f"{what} was signed with key id {key_id!r}, which this keyring does not hold "
            f"(it signs with {self.key_id!r}; older keys: RIVERFLOW_VERIFICATION_KEYS)"
        )

    def every(self) -> list[bytes]:
        return [self.key, *self.older.values()]


Keys = bytes | Keyring


def keyring(keys: Keys) -> Keyring:
    """``keys`` as a keyring (a bare key is the ring of one key, id ``"1"``)."""
    return keys if isinstance(keys, Keyring) else Keyring("1", keys)


def _header(magic: bytes, key_id: str) -> bytes:
    raw = key_id.encode()
    return magic + bytes([len(raw)]) + raw


def sign(obj: Any, keys: Keys) -> bytes:
    """``KEYED_MAGIC + id + HMAC-SHA256(header + payload) + payload``, the payload the
    pickle, signed with the ring's signing key."""
    ring = keyring(keys)
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    header = _header(KEYED_MAGIC, ring.key_id)
    return header + hmac.new(ring.key, header + payload, _DIGEST).digest() + payload


def verify_and_load(blob: bytes, keys: Keys) -> Any:
    """Unpickle ``blob`` only if its signature verifies with a key of the ring."""
    payload = _verified(blob, keyring(keys), MAGIC, KEYED_MAGIC, "model snapshot")
    return pickle.loads(payload)


def signed_with(blob: bytes) -> str | None:
    """The key id a signed blob or document names (None: signed before key ids)."""
    if blob[:4] in (KEYED_MAGIC, KEYED_DOCUMENT_MAGIC) and len(blob) > 5:
        return blob[5 : 5 + blob[4]].decode(errors="replace")
    return None


def sign_bytes(payload: bytes, keys: Keys) -> bytes:
    """``KEYED_DOCUMENT_MAGIC + id + HMAC-SHA256(header + payload) + payload``."""
    ring = keyring(keys)
    header = _header(KEYED_DOCUMENT_MAGIC, ring.key_id)
    return header + hmac.new(ring.key, header + payload, _DIGEST).digest() + payload


def verify_bytes(blob: bytes, keys: Keys, what: str) -> bytes:
    """The payload of ``blob`` signed by ``sign_bytes`` with a key of the ring; ``what``
    names it in the error."""
    return _verified(blob, keyring(keys), DOCUMENT_MAGIC, KEYED_DOCUMENT_MAGIC, what)


def document_mac(payload: bytes, key: bytes) -> bytes:
    """The MAC of ``payload`` as a document under ``key`` (a signature kept apart)."""
    return hmac.new(key, DOCUMENT_MAGIC + payload, _DIGEST).digest()


def verify_mac(payload: bytes, mac: bytes, keys: Keys, what: str, key_id: str | None) -> None:
    """Refuse ``payload`` unless ``mac`` is its ``document_mac`` under the key ``key_id``
    of the ring (None, a signature from before key ids: any key of the ring)."""
    ring = keyring(keys)
    candidates = ring.every() if key_id is None else [ring.lookup(key_id, what)]
    if not any(hmac.compare_digest(mac, document_mac(payload, k)) for k in candidates):
        raise SignatureError(f"{what} signature does not verify (tampered or other key)")


def _verified(blob: bytes, ring: Keyring, legacy: bytes, keyed: bytes, what: str) -> bytes:
    size = _DIGEST().digest_size
    if blob.startswith(keyed) and len(blob) > len(keyed):
        end = len(keyed) + 1 + blob[len(keyed)]
        header, key_id = blob[:end], blob[len(keyed) + 1 : end].decode(errors="replace")
        key = ring.lookup(key_id, what)
        mac, payload = blob[end : end + size], blob[end + size :]
        if len(mac) == size and hmac.compare_digest(
            mac, hmac.new(key, header + payload, _DIGEST).digest()
        ):
            return payload
        raise SignatureError(f"{what} signature does not verify (tampered or other key)")
    if len(blob) < len(legacy) + size or not blob.startswith(legacy):
        raise SignatureError(f"{what} is not signed by riverflow: refused")
    # before key ids: the legacy covered only the payload for a pickle, and the
    # marker too for a document
    covered = legacy if legacy == DOCUMENT_MAGIC else b""
    mac, payload = blob[len(legacy) : len(legacy) + size], blob[len(legacy) + size :]
    for key in ring.every():
        if hmac.compare_digest(mac, hmac.new(key, covered + payload, _DIGEST).digest()):
            return payload
    raise SignatureError(f"{what} signature does not verify (tampered or other key)")
