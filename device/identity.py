"""The device's identity: its two key pairs, and what it pinned about the cloud at enrollment.

Files under ``device.state_dir`` (directory mode 0700, every file 0600, written atomically):

* ``keys/device-sign.key``, ``keys/device-box.key`` - the Ed25519 signing key and the X25519
  box key (protocol/keys.py). Generated here, on the device; only their public halves leave it,
  once, in the enrollment request.
* ``enrollment.json`` - the cloud's URL, its pinned public keys (box key: events are sealed to
  it and results opened against it; release key: model signatures) and the device id they were
  enrolled under. Public data, but a swapped pin would let someone impersonate the cloud, so it
  gets the same care as a secret.

``enroll()`` is the client of ``POST /v1/enroll`` (docs/protocol.md): one-time token in, the
cloud's keys out. Repeating it with the same token and keys after a lost answer is safe (the
cloud answers 200 with the same body).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from edgekeeper.errors import ConfigError, PermanentError, RetryableError, classified
from edgekeeper.log import get_logger
from edgekeeper.protocol.keys import CloudPublicKeys, DeviceKeys, b64e, read_secret, write_secret
from edgekeeper.tls import client_context

log = get_logger(__name__)

KEYS_DIR = "keys"
ENROLLMENT_FILE = "enrollment.json"
PROTOCOL_VERSION = 1
_MAX_ANSWER = 64 * 1024


class EnrollmentError(PermanentError):
    """The cloud refused the enrollment (bad token, id taken ...); the message says why."""

    def __init__(self, message: str, *, code: str = "", fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.code = code


class CloudUnreachable(RetryableError, ConnectionError):
    """The cloud did not answer (connection refused, timeout, DNS)."""


@dataclass(frozen=True)
class Enrollment:
    """What the device pinned when it enrolled."""

    device_id: str
    cloud_url: str
    cloud: CloudPublicKeys
    enrolled_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "cloud_url": self.cloud_url,
            "cloud": self.cloud.to_json(),
            "enrolled_at": self.enrolled_at,
        }


def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / KEYS_DIR


def load_or_create_keys(state_dir: Path) -> tuple[DeviceKeys, bool]:
    """The device's keys, generated (and saved 0600) on first use. Returns (keys, created)."""
    d = keys_dir(state_dir)
    if DeviceKeys.exists(d):
        return DeviceKeys.load(d), False
    keys = DeviceKeys.generate()
    keys.save(d)
    log.info("device.keys_generated", sign_pk=b64e(keys.sign_pk), box_pk=b64e(keys.box_pk))
    return keys, True


def load_keys(state_dir: Path) -> DeviceKeys:
    d = keys_dir(state_dir)
    if not DeviceKeys.exists(d):
        raise ConfigError(
            f"the device has no keys in {d}",
            fix="run `edgekeeper device keys`, then "
            "`edgekeeper device enroll --cloud URL --token=TOKEN`",
        )
    return DeviceKeys.load(d)


def save_enrollment(state_dir: Path, enrollment: Enrollment) -> Path:
    path = Path(state_dir) / ENROLLMENT_FILE
    write_secret(path, json.dumps(enrollment.to_json(), indent=2).encode() + b"\n")
    return path


def load_enrollment(state_dir: Path, device_id: str | None = None) -> Enrollment:
    """The pinned cloud, or a ConfigError saying how to enroll."""
    path = Path(state_dir) / ENROLLMENT_FILE
    if not path.exists():
        raise ConfigError(
            f"this device is not enrolled ({path} does not exist)",
            fix="edgekeeper device enroll --cloud URL --token=TOKEN (token from "
            "`edgekeeper cloud token` on the cloud)",
        )
    try:
        raw = read_secret(path, length=path.stat().st_size)
        data = json.loads(raw.decode("utf-8"))
        enrollment = Enrollment(
            device_id=str(data["device_id"]),
            cloud_url=str(data["cloud_url"]),
            cloud=CloudPublicKeys.from_json(data["cloud"]),
            enrolled_at=float(data["enrolled_at"]),
        )
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"enrollment file {path} is damaged: {err}",
            fix="enroll again: edgekeeper device enroll --cloud URL --token=TOKEN",
        ) from None
    if device_id is not None and enrollment.device_id != device_id:
        raise ConfigError(
            f"{path} was enrolled as device {enrollment.device_id!r}, but device.id is "
            f"{device_id!r}",
            fix=f"set device.id = {enrollment.device_id!r}, or enroll this id with a new token",
        )
    return enrollment


def _error_of(status: int, text: str) -> tuple[str, str, str | None]:
    """(code, message, fix) from a JSON error body, tolerating anything else."""
    try:
        err = json.loads(text)["error"]
        return str(err.get("code", "")), str(err.get("message", "")), err.get("fix") or None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return "", f"HTTP {status}: {text[:200]}", None


async def enroll(
    cloud_url: str,
    token: str,
    *,
    device_id: str,
    state_dir: Path,
    timeout: float = 30.0,
    session: aiohttp.ClientSession | None = None,
    ca_file: str = "",
) -> Enrollment:
    """Register this device's public keys with the cloud and pin the cloud's keys.

    The keys are created first if the device has none. Raises EnrollmentError when the cloud
    refuses (the message and fix come from its JSON error), CloudUnreachable when it does not
    answer.
    """
    if not cloud_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"cloud URL {cloud_url!r} must start with http:// or https://",
            fix="pass the ingest's base URL, e.g. --cloud https://ingest.example.org",
        )
    if not token or len(token) > 512:
        raise ConfigError("the enrollment token is empty or too long",
                          fix="copy the token printed by `edgekeeper cloud token`")
    # Files and key generation: off the event loop, like every disk access.
    keys, _ = await asyncio.to_thread(load_or_create_keys, state_dir)
    base = cloud_url.rstrip("/")
    payload = {
        "token": token,
        "device_id": device_id,
        "sign_pk": b64e(keys.sign_pk),
        "box_pk": b64e(keys.box_pk),
    }
    own = session is None
    sess = session or aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0)),
        connector=aiohttp.TCPConnector(ssl=client_context(ca_file) or True),
    )
    try:
        # Transport errors (aiohttp, timeouts, OS errors) become ours where they enter.
        with classified(f"cannot reach {base}/v1/enroll"):
            async with sess.post(f"{base}/v1/enroll", json=payload) as resp:
                text = (await resp.content.read(_MAX_ANSWER)).decode("utf-8", "replace")
                status = resp.status
    except RetryableError as err:
        raise CloudUnreachable(
            err.message, fix="check the URL and that `edgekeeper cloud serve` runs there"
        ) from err
    finally:
        if own:
            await sess.close()
    if status not in (200, 201):
        code, message, fix = _error_of(status, text)
        raise EnrollmentError(f"the cloud refused the enrollment ({code or status}): {message}",
                              code=code, fix=fix)
    try:
        answer = json.loads(text)
        if answer.get("device_id") != device_id:
            raise ValueError(f"it enrolled {answer.get('device_id')!r}, not {device_id!r}")
        if answer.get("protocol_version") != PROTOCOL_VERSION:
            raise ValueError(f"protocol_version {answer.get('protocol_version')!r} is not 1")
        cloud = CloudPublicKeys.from_json(answer.get("cloud"))
    except (ValueError, AttributeError, RecursionError) as err:
        raise EnrollmentError(
            f"the enrollment answer from {base} is not valid: {err}",
            fix="check that the URL points at an edgekeeper cloud of the same version",
        ) from None
    enrollment = Enrollment(device_id=device_id, cloud_url=base, cloud=cloud,
                            enrolled_at=time.time())
    path = await asyncio.to_thread(save_enrollment, state_dir, enrollment)
    log.info("device.enrolled", cloud_url=base, pinned=str(path),
             cloud_box_pk=b64e(cloud.box_pk))
    return enrollment
