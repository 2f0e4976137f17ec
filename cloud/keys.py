"""The cloud's own keys, kept under ``<data_dir>/keys/`` in files of mode 0600.

* ``cloud-box.key``: X25519 secret key. Events are sealed to its public half; results are sealed
  with it, so a device that pinned the public half knows a result came from this cloud.
* ``release-sign.key``: Ed25519 key that signs model releases (later issue). It is separate from
  the box key so it can live offline: move the file away and keep ``release-sign.pub``; the
  ingest only ever needs the public half, which devices pin at enrollment.

Both are generated on first use (``CloudKeys.ensure``) and never logged or sent.

* ``operator.pub`` / ``operator.key``: the operator's X25519 pair (``edgekeeper cloud keys
  operator``). Workers seal each result's summary to ``operator.pub`` with a SealedBox, and only
  ``operator.key`` opens it, so the store alone (a stolen database, a backup) reveals no label
  or summary. ``operator.key`` belongs with the operator: move it off the cloud host and pass
  ``--operator-key PATH`` to ``cloud results``. A SealedBox rather than a Box with the cloud's
  box key because a Box can be opened by either side: ``cloud-box.key`` lives on the cloud
  host, so anyone holding it and a copy of the database could read every summary; the
  SealedBox's ephemeral secret is dropped once sealed. Anyone who can write the table could
  forge a row either way, and the row binds its device and seq (checked when opened).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey

from edgekeeper.cloud.store.base import ResultSummary, SealedSummary
from edgekeeper.errors import ConfigError
from edgekeeper.log import get_logger
from edgekeeper.protocol.keys import CloudPublicKeys, read_secret, write_secret

log = get_logger(__name__)

BOX_FILE = "cloud-box.key"
RELEASE_FILE = "release-sign.key"
RELEASE_PUB_FILE = "release-sign.pub"
OPERATOR_FILE = "operator.key"
OPERATOR_PUB_FILE = "operator.pub"


@dataclass(frozen=True, repr=False)
class CloudKeys:
    box_key: PrivateKey
    release_pk: bytes
    # None when the release key is kept offline.
    release_signing_key: SigningKey | None = None
    # None until ``edgekeeper cloud keys operator``: workers then store no summaries.
    operator_pk: bytes | None = None

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
        return cls(box_key=box, release_pk=release_pk, release_signing_key=signing,
                   operator_pk=operator_public_key(data_dir))

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


def operator_public_key(data_dir: Path) -> bytes | None:
    """The operator's public key from ``<data_dir>/keys/operator.pub`` (hex), None if absent."""
    path = CloudKeys.directory(data_dir) / OPERATOR_PUB_FILE
    if not path.exists():
        return None
    try:
        pk = bytes.fromhex(path.read_text("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        pk = b""
    if len(pk) != 32:
        raise ConfigError(f"operator public key {path} is not 64 hex digits",
                          fix="restore it, or run 'edgekeeper cloud keys operator' for a new pair")
    return pk


def create_operator_key(data_dir: Path, secret_path: Path | None = None) -> bytes:
    """Generate the operator pair: the secret to ``secret_path`` (default
    ``<data_dir>/keys/operator.key``), the public half to ``operator.pub``; returns the public
    key. Refuses to replace an existing pair: summaries sealed to it would become unreadable."""
    d = CloudKeys.directory(data_dir)
    secret_path = Path(secret_path) if secret_path is not None else d / OPERATOR_FILE
    if (d / OPERATOR_PUB_FILE).exists() or secret_path.exists():
        raise ConfigError(
            f"an operator key already exists ({d / OPERATOR_PUB_FILE})",
            fix="keep using it; to replace it, move both files away first (summaries sealed "
                "to the old key then need the old operator.key)")
    sk = PrivateKey.generate()
    write_secret(secret_path, bytes(sk))
    write_secret(d / OPERATOR_PUB_FILE, bytes(sk.public_key).hex().encode() + b"\n")
    log.info("keys.operator_key_generated", path=str(secret_path))
    return bytes(sk.public_key)


def load_operator_key(path: Path, data_dir: Path) -> PrivateKey:
    """The operator's secret key at ``path``; a clear error when it is missing or does not
    match ``operator.pub``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"operator key {path} does not exist: result summaries are sealed to it",
            fix="pass --operator-key PATH (where the operator keeps operator.key), or run "
                "'edgekeeper cloud keys operator' if this cloud has none yet")
    sk = PrivateKey(read_secret(path))
    pk = operator_public_key(data_dir)
    if pk is not None and bytes(sk.public_key) != pk:
        raise ConfigError(
            f"operator key {path} does not match "
            f"{CloudKeys.directory(data_dir) / OPERATOR_PUB_FILE}",
            fix="pass the operator.key that belongs to this cloud with --operator-key PATH")
    return sk


_SEALED_FIELDS = ("label", "confidence", "summary", "action", "reasoner", "provisional")


def seal_summary(s: ResultSummary, operator_pk: bytes) -> SealedSummary:
    """Seal what the operator may read of a result; keep only ordering columns in the clear."""
    doc = {"device_id": s.device_id, "seq": s.seq,
           **{k: getattr(s, k) for k in _SEALED_FIELDS}}
    sealed = SealedBox(PublicKey(operator_pk)).encrypt(json.dumps(doc).encode())
    return SealedSummary(s.device_id, s.seq, s.produced_at, s.received_at, bytes(sealed))


def open_summary(row: SealedSummary, operator_sk: PrivateKey) -> ResultSummary:
    """Open a sealed summary; a row that does not open, or names another device or seq than
    its columns (a row copied over another), raises ConfigError."""
    try:
        doc = json.loads(SealedBox(operator_sk).decrypt(row.sealed))
        if (doc["device_id"], doc["seq"]) != (row.device_id, row.seq):
            raise ValueError("moved row")
        return ResultSummary(
            device_id=row.device_id, seq=row.seq, label=str(doc["label"]),
            confidence=float(doc["confidence"]), summary=str(doc["summary"]),
            action=str(doc["action"]), reasoner=str(doc["reasoner"]),
            provisional=bool(doc["provisional"]), produced_at=row.produced_at,
            received_at=row.received_at)
    except (CryptoError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"the summary of {row.device_id} seq {row.seq} does not open with this operator key",
            fix="pass the operator.key whose public half the workers sealed to") from None
