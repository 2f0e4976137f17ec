"""Identities shared by both halves of the link: key pairs, public parts, secret files.

A device holds two private keys, generated on the device and never sent anywhere:

* an Ed25519 *signing* key: signs HTTP requests other than event uploads (results long-poll, ack);
* an X25519 *box* key: crypto_box (nacl.public.Box) from the device to the cloud for events, and
  from the cloud to the device for results. A Box authenticates the sender to the receiver, which
  a SealedBox cannot (anyone holding the cloud's public key could forge one).

The cloud holds its own X25519 box key and a *separate* Ed25519 release-signing key (models are
signed with it later; it may live offline, so the cloud serves only its public half).

Public API:

* ``DeviceKeys.generate()`` / ``.save(directory)`` / ``DeviceKeys.load(directory)`` /
  ``DeviceKeys.exists(directory)``; ``.sign_pk`` / ``.box_pk`` (32 bytes each);
  ``.public(device_id) -> DevicePublicKeys``.
* ``DevicePublicKeys(device_id, sign_pk, box_pk, revoked=False)``: what the cloud's registry
  knows about a device.
* ``CloudPublicKeys(box_pk, release_pk)``: what a device pins at enrollment;
  ``.to_json()`` / ``CloudPublicKeys.from_json()``, ``.save(path)`` /
  ``CloudPublicKeys.load(path)``.
* ``write_secret(path, data)`` / ``read_secret(path)``: files of mode 0600, written atomically,
  refused on load when group or others can read them (as ssh does).
* ``b64e`` / ``b64d``: the base64 used for keys in JSON (standard alphabet, padded).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from edgekeeper.errors import ConfigError
from edgekeeper.fs import open_private

KEY_BYTES = 32
DEVICE_SIGN_FILE = "device-sign.key"
DEVICE_BOX_FILE = "device-box.key"


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str, *, what: str = "value", length: int | None = None) -> bytes:
    """Decode base64 strictly; ValueError naming ``what`` on bad input or wrong length."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError):
        raise ValueError(f"{what} is not valid base64") from None
    if length is not None and len(data) != length:
        raise ValueError(f"{what} must decode to {length} bytes, got {len(data)}")
    return data


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file + fsync + os.replace).

    The temp file is created 0600 from the start (O_EXCL), so the secret is never readable by
    others, not even for an instant; a crash leaves either the old file or the new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):  # left by a crash of this pid's predecessor
        tmp.unlink()
    fd = open_private(tmp, os.O_WRONLY)  # 0600 (its directory 0700) whatever the umask
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_secret(path: Path, *, length: int = KEY_BYTES) -> bytes:
    """Read a secret file, refusing one others may read or one of the wrong size."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(
            f"key file {path} does not exist",
            fix="generate keys first (edgekeeper device keys / they are created on first use)",
        ) from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others can read it",
            fix=f"chmod 600 {path}",
        )
    data = path.read_bytes()
    if len(data) != length:
        raise ConfigError(
            f"key file {path} holds {len(data)} bytes, expected {length}",
            fix=f"restore {path} from a backup, or delete it and enroll again with new keys",
        )
    return data


@dataclass(frozen=True)
class DevicePublicKeys:
    """A device as the cloud's registry knows it: id, public keys, revocation flag."""

    device_id: str
    sign_pk: bytes
    box_pk: bytes
    revoked: bool = False

    def __post_init__(self) -> None:
        if len(self.sign_pk) != KEY_BYTES or len(self.box_pk) != KEY_BYTES:
            raise ValueError("public keys must be 32 bytes each")


@dataclass(frozen=True)
class CloudPublicKeys:
    """The cloud's public keys, pinned on the device at enrollment."""

    box_pk: bytes
    release_pk: bytes

    def __post_init__(self) -> None:
        if len(self.box_pk) != KEY_BYTES or len(self.release_pk) != KEY_BYTES:
            raise ValueError("cloud public keys must be 32 bytes each")

    def to_json(self) -> dict[str, Any]:
        return {"box_pk": b64e(self.box_pk), "release_pk": b64e(self.release_pk)}

    @classmethod
    def from_json(cls, data: Any) -> CloudPublicKeys:
        if not isinstance(data, dict):
            raise ValueError("cloud keys must be a JSON object with box_pk and release_pk")
        return cls(
            box_pk=b64d(data.get("box_pk", ""), what="box_pk", length=KEY_BYTES),
            release_pk=b64d(data.get("release_pk", ""), what="release_pk", length=KEY_BYTES),
        )

    def save(self, path: Path) -> None:
        # Public, but a swapped pin would let someone impersonate the cloud: keep it 0600 and
        # write it atomically like the secrets.
        write_secret(Path(path), json.dumps(self.to_json(), indent=2).encode() + b"\n")

    @classmethod
    def load(cls, path: Path) -> CloudPublicKeys:
        path = Path(path)
        try:
            data = json.loads(path.read_text("utf-8"))
            return cls.from_json(data)
        except FileNotFoundError:
            raise ConfigError(
                f"pinned cloud keys {path} do not exist",
                fix="enroll the device: edgekeeper device enroll --cloud URL --token=TOKEN",
            ) from None
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"pinned cloud keys {path} are not valid: {err}",
                fix="enroll the device again to re-pin the cloud's keys",
            ) from None


class DeviceKeys:
    """A device's two private keys. ``repr`` never shows them."""

    __slots__ = ("box_key", "signing_key")

    def __init__(self, signing_key: SigningKey, box_key: PrivateKey) -> None:
        self.signing_key = signing_key
        self.box_key = box_key

    def __repr__(self) -> str:
        return f"DeviceKeys(sign_pk={b64e(self.sign_pk)}, box_pk={b64e(self.box_pk)})"

    @classmethod
    def generate(cls) -> DeviceKeys:
        return cls(SigningKey.generate(), PrivateKey.generate())

    @property
    def sign_pk(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def box_pk(self) -> bytes:
        return bytes(self.box_key.public_key)

    @property
    def box_sk(self) -> bytes:
        return bytes(self.box_key)

    def public(self, device_id: str) -> DevicePublicKeys:
        return DevicePublicKeys(device_id=device_id, sign_pk=self.sign_pk, box_pk=self.box_pk)

    @staticmethod
    def exists(directory: Path) -> bool:
        d = Path(directory)
        return (d / DEVICE_SIGN_FILE).exists() and (d / DEVICE_BOX_FILE).exists()

    def save(self, directory: Path) -> None:
        """Write both private keys under ``directory`` (mode 0600 files, 0700 directory)."""
        d = Path(directory)
        write_secret(d / DEVICE_SIGN_FILE, bytes(self.signing_key))
        write_secret(d / DEVICE_BOX_FILE, bytes(self.box_key))

    @classmethod
    def load(cls, directory: Path) -> DeviceKeys:
        d = Path(directory)
        return cls(
            SigningKey(read_secret(d / DEVICE_SIGN_FILE)),
            PrivateKey(read_secret(d / DEVICE_BOX_FILE)),
        )
