"""Enrollment: one-time tokens and the registry operations behind the CLI and ``POST /v1/enroll``.

A token is ``ekt_`` and 32 random bytes (URL-safe base64, so it pastes into a shell; the prefix
keeps it from starting with '-', which a command line would read as an option, and names it in a
paste or to a secret scanner). The store keeps only
its SHA-256: a leaked database copy holds no usable token. A token expires after
``cloud.token_ttl_seconds`` and is consumed by the transaction that registers the device.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from edgekeeper.cloud.store.base import EnrollOutcome, Store
from edgekeeper.protocol.device_id import device_id_problem
from edgekeeper.protocol.errors import InvalidRequest
from edgekeeper.protocol.keys import KEY_BYTES, b64d

TOKEN_BYTES = 32
TOKEN_PREFIX = "ekt_"
MAX_TOKEN_CHARS = 128


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


async def issue_token(store: Store, *, ttl_s: float, now: float) -> str:
    """Create a one-time enrollment token valid for ``ttl_s`` seconds; return it (shown once)."""
    # token_urlsafe alone starts one token in 64 with '-' (`--token -x...` then fails); the
    # prefix adds no bits and takes none: the 32 random bytes after it are whole.
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    await store.add_token(token_hash=token_hash(token), created_at=now, expires_at=now + ttl_s)
    return token


@dataclass(frozen=True, repr=False)
class EnrollRequest:
    token: str
    device_id: str
    sign_pk: bytes
    box_pk: bytes

    def __repr__(self) -> str:  # never show the token
        return f"EnrollRequest(device_id={self.device_id!r})"

    @classmethod
    def from_json(cls, data: Any) -> EnrollRequest:
        if not isinstance(data, dict):
            raise InvalidRequest("the enrollment body must be a JSON object")
        unknown = sorted(set(data) - {"token", "device_id", "sign_pk", "box_pk"})
        if unknown:
            raise InvalidRequest(f"unknown field {unknown[0]!r} in the enrollment body")
        token = data.get("token")
        # printable ASCII: JSON can carry lone surrogates ("\\ud800"), which no token holds and
        # which would not even hash (UnicodeEncodeError)
        if (
            not isinstance(token, str)
            or not 0 < len(token) <= MAX_TOKEN_CHARS
            or not (token.isascii() and token.isprintable())
        ):
            raise InvalidRequest("'token' must be the string printed by 'edgekeeper cloud token'")
        device_id = data.get("device_id")
        problem = device_id_problem(device_id, "'device_id'")
        if problem:
            raise InvalidRequest(problem, fix="set device.id on the device (docs/configuration.md)")
        keys: dict[str, bytes] = {}
        for name in ("sign_pk", "box_pk"):
            value = data.get(name)
            try:
                keys[name] = b64d(value if isinstance(value, str) else "", what=name,
                                  length=KEY_BYTES)
            except ValueError as err:
                raise InvalidRequest(f"'{name}': {err}") from None
        assert isinstance(device_id, str)
        return cls(token=token, device_id=device_id, **keys)


async def enroll(store: Store, request: EnrollRequest, *, now: float) -> EnrollOutcome:
    return await store.enroll(
        token_hash=token_hash(request.token),
        device_id=request.device_id,
        sign_pk=request.sign_pk,
        box_pk=request.box_pk,
        now=now,
    )


async def revoke(store: Store, device_id: str, *, now: float) -> bool:
    """Revoke a device: from then on it gets 401 device_revoked (within the ingest's
    registry_refresh_seconds when revoked from another process)."""
    return await store.revoke(device_id, now=now)
