"""The cloud's own keys, kept under ``<data_dir>/keys/`` in files of mode 0600.

* ``cloud-box.key``: X25519 secret key. Events are sealed to its public half; results are sealed
  with it, so a device that pinned the public half knows a result came from this cloud.
* ``release-sign.key``: Ed25519 key that signs model releases (later issue). It is separate from
  the box key so it can live offline: move the file away and keep ``release-sign.pub``; the
  ingest only ever needs the public half, which devices pin at enrollment.

Both are generated on first use (``CloudKeys.ensure``) and never logged or sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from edgekeeper.errors import ConfigError
from edgekeeper.log import get_logger
from edgekeeper.protocol.keys import CloudPublicKeys, read_secret, write_secret

log = get_logger(__name__)

BOX_FILE = "cloud-box.key"
RELEASE_FILE = "release-sign.key"
RELEASE_PUB_FILE = "release-sign.pub"


@dataclass(frozen=True, repr=False)
class CloudKeys:
    box_key: PrivateKey
    release_pk: bytes
    # None when the release key is kept offline.
    release_signing_key: SigningKey | None = None

    def __repr__(self) -> str:
        return (f"CloudKeys(box_pk={bytes(self.box_key.public_key).hex()[:16]}..., "
                f"offline_release={self.release_signing_key is None})")

    @property
    def box_pk(self) -> bytes:
        return bytes(self.box_key.public_key)

    def public(self) -> CloudPublicKeys:
        return CloudPublicKeys(box_pk=self.box_pk, release_pk=self.release_pk)

    @staticmethod
    def directory(data_dir: Path) -> Path:
        return Path(data_dir) / "keys"

    @classmethod
    def load(cls, data_dir: Path) -> CloudKeys:
        d = cls.directory(data_dir)
        box = PrivateKey(read_secret(d / BOX_FILE))
        pub_path = d / RELEASE_PUB_FILE
        try:
            release_pk = bytes.fromhex(pub_path.read_text("ascii").strip())
        except (OSError, ValueError, UnicodeDecodeError):
            raise ConfigError(
                f"release public key {pub_path} is missing or not 64 hex digits",
                fix=f"restore {pub_path} (the hex Ed25519 public key of the release key)",
            ) from None
        if len(release_pk) != 32:
            raise ConfigError(f"release public key {pub_path} is not 32 bytes", fix="restore it")
        signing: SigningKey | None = None
        if (d / RELEASE_FILE).exists():
            signing = SigningKey(read_secret(d / RELEASE_FILE))
            if bytes(signing.verify_key) != release_pk:
                raise ConfigError(
                    f"{d / RELEASE_FILE} does not match {pub_path}",
                    fix="restore the matching pair from backup",
                )
        return cls(box_key=box, release_pk=release_pk, release_signing_key=signing)

    @classmethod
    def ensure(cls, data_dir: Path) -> CloudKeys:
        """Load the keys, generating any that do not exist yet (first start)."""
        d = cls.directory(data_dir)
        if not (d / BOX_FILE).exists():
            write_secret(d / BOX_FILE, bytes(PrivateKey.generate()))
            log.info("keys.box_key_generated", path=str(d / BOX_FILE))
        if not (d / RELEASE_PUB_FILE).exists():
            if (d / RELEASE_FILE).exists():
                signing = SigningKey(read_secret(d / RELEASE_FILE))
            else:
                signing = SigningKey.generate()
                write_secret(d / RELEASE_FILE, bytes(signing))
                log.info("keys.release_signing_key_generated", path=str(d / RELEASE_FILE))
            write_secret(d / RELEASE_PUB_FILE, bytes(signing.verify_key).hex().encode() + b"\n")
        return cls.load(data_dir)
