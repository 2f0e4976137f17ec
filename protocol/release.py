"""Signed model releases: what the cloud publishes and what a device checks before it loads one.

A release is a folder of model files and one ``release.json``. ``release.json`` is a DSSE
envelope (the in-toto/Sigstore "Dead Simple Signing Envelope"): the release body as JSON bytes,
base64-encoded, and Ed25519 signatures over DSSE's pre-authentication encoding of those exact
bytes. Signing bytes, not a re-serialised object, means no canonical-JSON rules to get wrong: the
device verifies the bytes it received and only then parses them.

The body (``ReleaseBody``) names the model family and version, the version it was trained from,
its scope (the whole fleet, a group, or one device), the gate manifest to load (``entry``), the
sha256 and length of every file, the labels and input spec, metrics, when it was created and
when it expires, and the oldest edgekeeper that can run it. It is signed with the cloud's
release key (``<data_dir>/keys/release-sign.key``), which devices pinned at enrollment and which
may live offline: ``edgekeeper cloud release sign`` works on any machine holding the key.

Rules a device applies (``check_update``), each a ``ReleaseRefused`` with a stable ``reason``:

* ``malformed``: not a DSSE envelope, or a body that does not parse or breaks a rule below;
* ``unknown_key`` / ``bad_signature``: no signature by the pinned key, or one that fails;
* ``expired``: ``expires_at`` is in the past;
* ``wrong_model``: the release is for another model family or modality than the slot;
* ``not_newer``: the version is not higher than the running one. Only a release marked
  ``rollback`` may go back, and then only if it was created after the running release (an old,
  validly signed rollback cannot be replayed to pin a device to a bad model);
* ``runtime_too_old``: ``min_runtime`` is newer than this edgekeeper;
* ``input_mismatch``: the input spec does not fit what the device feeds the gate;
* ``file_mismatch``: a file's length or sha256 differs (``check_file``, ``verify_files``).

Versions are ``MAJOR.MINOR.PATCH`` (digits only) and compare as integer triples.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from edgekeeper.errors import PermanentError

SCHEMA = 1
PAYLOAD_TYPE = "application/vnd.edgekeeper.release+json"
RELEASE_FILE = "release.json"
# A release.json is small: a few file entries and metrics. A bigger one is refused unread.
MAX_RELEASE_BYTES = 256 * 1024
# Model files are small (the gates are under 1 MB; the shared audio front ends about 1.3 MB).
MAX_FILE_BYTES = 64 * 1024 * 1024
_VERSION = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ScopeKind = Literal["fleet", "group", "device"]
Reason = Literal[
    "malformed", "unknown_key", "bad_signature", "expired", "wrong_model", "not_newer",
    "runtime_too_old", "input_mismatch", "file_mismatch",
]


class ReleaseRefused(PermanentError):
    """A release a device must not load. ``reason`` is one of ``Reason`` (logged and reported)."""

    def __init__(self, reason: Reason, message: str, *, fix: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, fix=fix)


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.2.0" -> (1, 2, 0)``; anything else is a ``malformed`` refusal."""
    m = _VERSION.match(text) if isinstance(text, str) else None
    if m is None:
        raise ReleaseRefused("malformed", f"version {text!r} is not MAJOR.MINOR.PATCH",
                             fix="versions are three dot-separated integers, e.g. 1.2.0")
    return int(m[1]), int(m[2]), int(m[3])


def next_version(current: str, part: Literal["major", "minor", "patch"] = "minor") -> str:
    major, minor, patch = parse_version(current)
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def key_id(public_key: bytes) -> str:
    """The short name of a release key in signatures: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Scope:
    """Who a release is for: ``fleet`` (name ""), a ``group`` by name, or one ``device`` by id."""

    kind: ScopeKind = "fleet"
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("fleet", "group", "device"):
            raise ValueError(f"scope kind {self.kind!r} is not fleet, group or device")
        if (self.kind == "fleet") != (self.name == ""):
            raise ValueError("a fleet scope has no name; group and device scopes need one")

    def __str__(self) -> str:
        return self.kind if self.kind == "fleet" else f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> Scope:
        """``fleet``, ``group:NAME`` or ``device:ID``."""
        kind, _, name = text.partition(":")
        if kind not in ("fleet", "group", "device"):
            raise ValueError(f"scope {text!r} is not fleet, group:NAME or device:ID")
        return cls(kind, name)  # type: ignore[arg-type]  # checked just above


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators, no '..'
    sha256: str
    length: int


@dataclass(frozen=True)
class InputSpec:
    """What the gate is fed. Vision: the model's image size and colour order. Audio: the sample
    rate the microphone is opened at, the window and the hop."""

    modality: Literal["vision", "audio"]
    width: int = 0
    height: int = 0
    color: str = ""
    sample_rate: int = 0
    window_seconds: float = 0.0
    hop_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        if self.modality == "vision":
            return {"modality": "vision", "width": self.width, "height": self.height,
                    "color": self.color}
        return {"modality": "audio", "sample_rate": self.sample_rate,
                "window_seconds": self.window_seconds, "hop_seconds": self.hop_seconds}


@dataclass(frozen=True)
class ReleaseBody:
    model: str  # the model family: "person", "sound"
    version: str
    parent: str | None  # the version it was trained from (None for a first release)
    scope: Scope
    entry: str  # the gate manifest inside the release (docs/models.md), e.g. manifest-int8.json
    files: tuple[FileEntry, ...]
    labels: tuple[str, ...]
    input: InputSpec
    created_at: float
    expires_at: float
    min_runtime: str = "0.1.0"
    rollback: bool = False
    metrics: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def tag(self) -> str:
        return f"{self.model}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "version": self.version,
            "parent": self.parent,
            "scope": {"kind": self.scope.kind, "name": self.scope.name},
            "entry": self.entry,
            "files": [{"path": f.path, "sha256": f.sha256, "length": f.length}
                      for f in self.files],
            "labels": list(self.labels),
            "input": self.input.to_json(),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "min_runtime": self.min_runtime,
            "rollback": self.rollback,
            "metrics": dict(self.metrics),
            "notes": self.notes,
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


# ------------------------------------------------------------------------------- parse a body


def _bad(message: str) -> ReleaseRefused:
    return ReleaseRefused(
        "malformed", f"release body: {message}",
        fix="rebuild the release with edgekeeper cloud release (docs/model-updates.md)",
    )


def _get(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise _bad(f"missing '{key}'")
    value = data[key]
    if isinstance(value, bool) and kind is not bool:
        raise _bad(f"'{key}' has the wrong type")
    if not isinstance(value, kind):
        raise _bad(f"'{key}' has the wrong type")
    return value


def safe_path(path: str) -> str:
    """A file name inside a release: relative, POSIX, no '..', no hidden or empty parts."""
    p = PurePosixPath(path)
    if (not path or p.is_absolute() or "\\" in path or len(path) > 200
            or any(part in ("", ".", "..") or part.startswith(".") for part in p.parts)
            or str(p) != path or path == RELEASE_FILE):
        raise _bad(f"file path {path!r} is not a plain relative path")
    return path


def _number(data: Mapping[str, Any], key: str) -> float:
    value = float(_get(data, key, (int, float)))
    if not math.isfinite(value):
        raise _bad(f"'{key}' is not finite")
    return value


def body_from_json(data: Any) -> ReleaseBody:
    if not isinstance(data, dict):
        raise _bad("the top level must be an object")
    if data.get("schema") != SCHEMA:
        raise ReleaseRefused("malformed", f"release schema {data.get('schema')!r} is not {SCHEMA}",
                             fix="upgrade edgekeeper on the device")
    model = _get(data, "model", str)
    if not _NAME.match(model):
        raise _bad(f"model name {model!r} is not lowercase letters, digits, '-' or '_'")
    version = _get(data, "version", str)
    parse_version(version)
    parent = data.get("parent")
    if parent is not None:
        parse_version(_get(data, "parent", str))
    raw_scope = _get(data, "scope", dict)
    try:
        scope = Scope(raw_scope.get("kind", ""), raw_scope.get("name", ""))
    except (ValueError, TypeError) as err:
        raise _bad(str(err)) from None
    files = []
    for i, raw in enumerate(_get(data, "files", list)):
        if not isinstance(raw, dict):
            raise _bad(f"files[{i}] must be an object")
        sha, length = _get(raw, "sha256", str), _get(raw, "length", int)
        if not _SHA256.match(sha) or not 0 <= length <= MAX_FILE_BYTES:
            raise _bad(f"files[{i}] needs a lowercase hex sha256 and a length in "
                       f"[0, {MAX_FILE_BYTES}]")
        files.append(FileEntry(safe_path(_get(raw, "path", str)), sha, length))
    if not files or len({f.path for f in files}) != len(files):
        raise _bad("files must list each file once")
    entry = _get(data, "entry", str)
    if entry not in {f.path for f in files}:
        raise _bad(f"entry {entry!r} is not one of the files")
    labels = tuple(_get(data, "labels", list))
    if (not labels or not all(isinstance(x, str) and x for x in labels)
            or len(set(labels)) != len(labels)):
        raise _bad("labels must be distinct non-empty strings")
    raw_input = _get(data, "input", dict)
    modality = raw_input.get("modality")
    try:
        if modality == "vision":
            spec = InputSpec("vision", width=int(raw_input["width"]),
                             height=int(raw_input["height"]), color=str(raw_input["color"]))
        elif modality == "audio":
            spec = InputSpec("audio", sample_rate=int(raw_input["sample_rate"]),
                             window_seconds=float(raw_input["window_seconds"]),
                             hop_seconds=float(raw_input["hop_seconds"]))
        else:
            raise _bad("input.modality must be vision or audio")
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(f"bad input spec ({err})") from None
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict):
        raise _bad("'metrics' must be an object")
    min_runtime = _get(data, "min_runtime", str)
    parse_version(min_runtime)
    rollback = _get(data, "rollback", bool)
    return ReleaseBody(
        model=model, version=version, parent=parent, scope=scope, entry=entry,
        files=tuple(files), labels=labels, input=spec,
        created_at=_number(data, "created_at"), expires_at=_number(data, "expires_at"),
        min_runtime=min_runtime, rollback=rollback, metrics=metrics,
        notes=str(data.get("notes", "")),
    )


# ----------------------------------------------------------------------------- sign and verify


def sign(body: ReleaseBody, signing_key: SigningKey) -> bytes:
    """The bytes of ``release.json``: a DSSE envelope around ``body`` signed by ``signing_key``."""
    return sign_payload(body.encode(), signing_key)


def sign_payload(payload: bytes, signing_key: SigningKey) -> bytes:
    """Sign exact body bytes (``cloud release sign`` signs what ``cloud release build`` wrote)."""
    body_from_json(_loads(payload))  # never sign what a device would refuse to parse
    sig = signing_key.sign(pae(PAYLOAD_TYPE, payload)).signature
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": key_id(bytes(signing_key.verify_key)),
                        "sig": base64.b64encode(sig).decode("ascii")}],
    }
    return json.dumps(envelope, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseRefused("malformed", f"not valid JSON ({err})") from None


def verify(data: bytes, release_pk: bytes) -> ReleaseBody:
    """Check ``release.json`` bytes against the pinned release key; return the body.

    Only the signature is checked here; ``check_update`` applies the rules that depend on what
    the device runs and the time.
    """
    if len(data) > MAX_RELEASE_BYTES:
        raise ReleaseRefused("malformed", f"release.json is {len(data)} bytes, over "
                                          f"{MAX_RELEASE_BYTES}")
    env = _loads(data)
    if not isinstance(env, dict) or env.get("payloadType") != PAYLOAD_TYPE:
        raise ReleaseRefused("malformed", "release.json is not an edgekeeper DSSE envelope")
    try:
        payload = base64.b64decode(str(env.get("payload", "")), validate=True)
    except (binascii.Error, ValueError):
        raise ReleaseRefused("malformed", "release.json payload is not base64") from None
    sigs = env.get("signatures")
    if not isinstance(sigs, list):
        raise ReleaseRefused("malformed", "release.json has no signatures list")
    want = key_id(release_pk)
    mine = [s for s in sigs if isinstance(s, dict) and s.get("keyid") == want]
    if not mine:
        keys = sorted({str(s.get("keyid")) for s in sigs if isinstance(s, dict)})
        raise ReleaseRefused(
            "unknown_key", f"release is signed by {keys or 'no key'}, not the pinned key {want}",
            fix="publish releases signed with this cloud's release key (cloud release sign)",
        )
    verifier = VerifyKey(release_pk)
    for s in mine:
        try:
            sig = base64.b64decode(str(s.get("sig", "")), validate=True)
            verifier.verify(pae(PAYLOAD_TYPE, payload), sig)
        except (binascii.Error, ValueError, BadSignatureError):
            continue
        return body_from_json(_loads(payload))
    raise ReleaseRefused("bad_signature", f"release signature by key {want} does not verify",
                         fix="the release was altered after signing: fetch it again or re-sign")


def check_update(
    body: ReleaseBody,
    *,
    model: str,
    input: InputSpec,
    running_version: str | None,
    running_created_at: float | None,
    runtime_version: str,
    now: float | None = None,
) -> None:
    """Raise ``ReleaseRefused`` unless ``body`` may replace what a device slot runs now."""
    now = time.time() if now is None else now
    if body.expires_at <= now:
        raise ReleaseRefused("expired", f"release {body.tag} expired at {body.expires_at:.0f} "
                                        f"(now {now:.0f})",
                             fix="publish a fresh release, or check the device's clock")
    if body.model != model:
        raise ReleaseRefused("wrong_model", f"release {body.tag} is not for model {model!r}")
    if body.input.modality != input.modality:
        raise ReleaseRefused("wrong_model", f"release {body.tag} is a {body.input.modality} "
                                            f"model; this slot runs {input.modality}")
    if running_version is not None:
        new, old = parse_version(body.version), parse_version(running_version)
        if body.rollback:
            if new == old:
                raise ReleaseRefused("not_newer", f"rollback {body.tag} is already running")
            if running_created_at is not None and body.created_at <= running_created_at:
                raise ReleaseRefused(
                    "not_newer", f"rollback {body.tag} is older than the running release",
                    fix="sign a new rollback release (cloud releases rollback)")
        elif new <= old:
            raise ReleaseRefused("not_newer", f"release {body.tag} is not newer than the running "
                                              f"{model}@{running_version}")
    try:
        too_old = parse_version(body.min_runtime) > parse_version(runtime_version)
    except ReleaseRefused:
        too_old = False  # a development build (0.0.0+unknown, 0.1.0.dev3): no claim to check
    if too_old:
        raise ReleaseRefused("runtime_too_old", f"release {body.tag} needs edgekeeper "
                                                f">= {body.min_runtime}, this is {runtime_version}",
                             fix="upgrade edgekeeper on the device")
    if input.modality == "audio" and body.input.sample_rate != input.sample_rate:
        raise ReleaseRefused(
            "input_mismatch", f"release {body.tag} takes {body.input.sample_rate} Hz audio; the "
                              f"microphone runs at {input.sample_rate} Hz",
            fix="a new sample rate needs a restart with the new model in the config")


def check_file(entry: FileEntry, data: bytes) -> None:
    if len(data) != entry.length:
        raise ReleaseRefused("file_mismatch", f"{entry.path}: {len(data)} bytes, the release "
                                              f"says {entry.length}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ReleaseRefused("file_mismatch", f"{entry.path}: sha256 differs from the release")


def file_digest(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def verify_files(body: ReleaseBody, directory: Path) -> None:
    """Every file of ``body`` is in ``directory`` with its length and hash."""
    for entry in body.files:
        try:
            digest, length = file_digest(directory / entry.path)
        except FileNotFoundError:
            raise ReleaseRefused("file_mismatch", f"{entry.path} is missing") from None
        if length != entry.length or digest != entry.sha256:
            raise ReleaseRefused("file_mismatch", f"{entry.path} does not match the release")


def describe_files(directory: Path, paths: Iterable[str]) -> tuple[FileEntry, ...]:
    """File entries (sha256, length) for ``paths`` inside ``directory``: for building a body."""
    out = []
    for p in sorted(paths):
        digest, length = file_digest(Path(directory) / safe_path(p))
        out.append(FileEntry(p, digest, length))
    return tuple(out)
