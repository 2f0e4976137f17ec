"""Two model slots per model family and one pointer: which model a device runs, crash-safe.

Layout under ``<state_dir>/models/<model>/`` (directories 0700, files 0600)::

    slot-a/        release.json + the release's files (verified before use)
    slot-b/
    incoming/      a download in progress (never loaded; emptied before each download)
    active.json    the pointer: which slot runs, its version, the sha256 of its release.json,
                   the trial state, the last good model to fall back to

A slot is only ever *written* while it is ``incoming/``: a release is downloaded there in full,
verified and shadow-evaluated, then renamed over the inactive slot, and only then does the
pointer name it. The pointer is replaced atomically (temp file, fsync, rename, fsync of the
folder), so after a power cut at any point it names either the old or the new model, never a
half of one. On every start (``recover``) the slot the pointer names is verified again against
its release.json (signature by the pinned release key, sha256 of release.json as pinned in the
pointer, every file's length and hash); if it fails, the pointer's last good model is tried, then
the shipped builtin model, which is the implicit first good model when no pointer exists.

A model in trial counts the boots it survives: the third start still in trial means it crashes
the device (or the trial never completes), and the last good model is restored at start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from edgekeeper.fs import open_private, private_dir, write_private
from edgekeeper.log import get_logger
from edgekeeper.protocol.release import (
    RELEASE_FILE,
    ReleaseBody,
    ReleaseRefused,
    file_digest,
    verify,
    verify_files,
)

log = get_logger(__name__)

Slot = Literal["a", "b"]
SLOTS: tuple[Slot, Slot] = ("a", "b")
POINTER = "active.json"
INCOMING = "incoming"
# A model still in trial at its third start is crashing the device: restore the last good one.
CRASH_BOOTS = 3
# Releases refused after download (shadow or trial) are remembered, so they are not fetched
# again; the newest few are enough (a new release has a new release.json).
_REJECTED_KEEP = 16


@dataclass(frozen=True)
class Ref:
    """One model: a slot's release, or the builtin model (``slot`` None)."""

    slot: Slot | None
    version: str
    release_created_at: float | None = None
    release_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.slot, "version": self.version,
                "release_created_at": self.release_created_at,
                "release_sha256": self.release_sha256}

    @classmethod
    def from_json(cls, data: Any) -> Ref:
        slot = data["slot"]
        if slot not in (None, *SLOTS):
            raise ValueError(f"slot {slot!r}")
        created = data.get("release_created_at")
        sha = data.get("release_sha256")
        if slot is not None and not isinstance(sha, str):
            raise ValueError("a slot needs its release_sha256")
        return cls(slot, str(data["version"]),
                   None if created is None else float(created),
                   None if sha is None else str(sha))

    @property
    def label(self) -> str:
        return "builtin" if self.slot is None else f"slot-{self.slot}"


@dataclass(frozen=True)
class Trial:
    started_at: float
    inferences: int = 0
    boots: int = 0


@dataclass(frozen=True)
class Pointer:
    active: Ref
    trial: Trial | None = None  # None: the active model is good
    fallback: Ref | None = None  # the last good model (None: the builtin)
    rejected: tuple[str, ...] = ()  # sha256 of release.json refused after download
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            **self.active.to_json(),
            "trial": None if self.trial is None else {
                "started_at": self.trial.started_at, "inferences": self.trial.inferences,
                "boots": self.trial.boots},
            "fallback": None if self.fallback is None else self.fallback.to_json(),
            "rejected": list(self.rejected),
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> Pointer:
        if not isinstance(data, dict) or data.get("schema") != 1:
            raise ValueError("not a schema 1 pointer")
        raw_trial = data.get("trial")
        trial = None if raw_trial is None else Trial(
            float(raw_trial["started_at"]), int(raw_trial["inferences"]),
            int(raw_trial["boots"]))
        raw_fb = data.get("fallback")
        return cls(
            active=Ref.from_json(data),
            trial=trial,
            fallback=None if raw_fb is None else Ref.from_json(raw_fb),
            rejected=tuple(str(x) for x in data.get("rejected", ())),
            updated_at=float(data.get("updated_at", 0.0)),
        )


@dataclass(frozen=True)
class Active:
    """What a start resolved to: the model to load, and what happened on the way."""

    ref: Ref
    manifest: Path
    body: ReleaseBody | None  # None for the builtin
    pointer: Pointer | None
    # (version, outcome, reason) to report to the cloud: a rollback decided at start.
    reports: tuple[tuple[str, str, str], ...] = field(default=())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a reader (or a restart) sees the old or the new bytes."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_private(tmp, data)  # 0600, fsynced
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a slot folder; renamed away first so a crash mid-delete leaves no half slot
    under a slot's name."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


class ModelStore:
    """The slots and pointer of one model family. Blocking file I/O: call from a thread."""

    def __init__(self, state_dir: Path, model: str, *, release_pk: bytes,
                 builtin_manifest: Path, builtin_version: str) -> None:
        self.model = model
        self.root = Path(state_dir) / "models" / model
        self.release_pk = bytes(release_pk)
        self.builtin_manifest = Path(builtin_manifest)
        self.builtin = Ref(None, builtin_version)

    # -- paths ---------------------------------------------------------------------------------
    def slot_dir(self, slot: Slot) -> Path:
        return self.root / f"slot-{slot}"

    @property
    def incoming(self) -> Path:
        return self.root / INCOMING

    @property
    def pointer_path(self) -> Path:
        return self.root / POINTER

    def manifest_of(self, ref: Ref, body: ReleaseBody | None) -> Path:
        if ref.slot is None or body is None:
            return self.builtin_manifest
        return self.slot_dir(ref.slot) / body.entry

    # -- the pointer ---------------------------------------------------------------------------
    def read_pointer(self) -> Pointer | None:
        try:
            raw = self.pointer_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Pointer.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as err:
            # Only a damaged disk gets here (the pointer is replaced atomically): start on the
            # builtin model rather than guess.
            log.error("update.pointer_damaged", path=str(self.pointer_path), error=str(err))
            return None

    def write_pointer(self, pointer: Pointer) -> Pointer:
        pointer = replace(pointer, updated_at=time.time())
        private_dir(self.root)
        atomic_write(self.pointer_path,
                     json.dumps(pointer.to_json(), indent=1, sort_keys=True).encode() + b"\n")
        return pointer

    # -- verification --------------------------------------------------------------------------
    def verify_dir(self, directory: Path, expect_sha256: str | None = None) -> ReleaseBody:
        """The release in ``directory``, checked whole: its release.json (pinned sha256 when
        given, signature by the pinned key) and every file's length and hash."""
        try:
            raw = (directory / RELEASE_FILE).read_bytes()
        except FileNotFoundError:
            raise ReleaseRefused("file_mismatch", f"{directory.name}: no {RELEASE_FILE}") from None
        if expect_sha256 is not None and hashlib.sha256(raw).hexdigest() != expect_sha256:
            raise ReleaseRefused("file_mismatch", f"{directory.name}/{RELEASE_FILE} is not the "
                                                  "release the pointer names")
        body = verify(raw, self.release_pk)
        if body.model != self.model:
            raise ReleaseRefused("wrong_model", f"{directory.name} holds {body.tag}")
        verify_files(body, directory)
        return body

    def verify_ref(self, ref: Ref) -> ReleaseBody | None:
        """None for the builtin (shipped with the package, not a download)."""
        if ref.slot is None:
            return None
        return self.verify_dir(self.slot_dir(ref.slot), ref.release_sha256)

    # -- start ---------------------------------------------------------------------------------
    def recover(self) -> Active:
        """Resolve the model to run at start: exactly one complete, verified model."""
        pointer = self.read_pointer()
        if pointer is None:
            return Active(self.builtin, self.builtin_manifest, None, None)
        reports: list[tuple[str, str, str]] = []
        if (old := pointer.trial) is not None:
            boots = old.boots + 1
            if boots >= CRASH_BOOTS:
                log.error("update.rolled_back", model=self.model, version=pointer.active.version,
                          reason="crash_loop", boots=boots,
                          to=(pointer.fallback or self.builtin).version)
                reports.append((pointer.active.version, "rolled_back",
                                f"crash_loop: {boots} starts without passing the trial"))
                pointer = self.write_pointer(self.rolled_back(pointer))
            else:
                trial = Trial(old.started_at, old.inferences, boots)
                pointer = self.write_pointer(replace(pointer, trial=trial))
        for ref in (pointer.active, pointer.fallback or self.builtin, self.builtin):
            try:
                body = self.verify_ref(ref)
            except (ReleaseRefused, OSError) as err:
                log.error("update.slot_damaged", model=self.model, slot=ref.label,
                          version=ref.version, error=str(err))
                continue
            if ref != pointer.active:
                # The active model did not verify: run the last good one, and say so on disk.
                pointer = self.write_pointer(Pointer(active=ref, trial=None, fallback=None,
                                                     rejected=pointer.rejected))
            return Active(ref, self.manifest_of(ref, body), body, pointer, tuple(reports))
        raise AssertionError("unreachable: the builtin always resolves")

    # -- changes -------------------------------------------------------------------------------
    def rolled_back(self, pointer: Pointer) -> Pointer:
        """The pointer after a failed trial: the last good model, the failed release rejected."""
        rejected = pointer.rejected
        if pointer.active.release_sha256 is not None:
            rejected = (*rejected, pointer.active.release_sha256)[-_REJECTED_KEEP:]
        return Pointer(active=pointer.fallback or self.builtin, trial=None, fallback=None,
                       rejected=rejected)

    def reject(self, pointer: Pointer | None, release_sha256: str) -> Pointer:
        base = pointer or Pointer(active=self.builtin)
        return self.write_pointer(replace(
            base, rejected=(*base.rejected, release_sha256)[-_REJECTED_KEEP:]))

    def empty_incoming(self) -> Path:
        remove_tree(self.incoming)
        return private_dir(self.incoming)

    def install(self, slot: Slot) -> Path:
        """Move the verified ``incoming/`` over ``slot`` (the inactive one). The pointer does not
        name ``slot`` as active, so a crash before, between or after the renames leaves the
        running model as it is; the slot is then either its old content, absent, or the new."""
        target = self.slot_dir(slot)
        remove_tree(target)
        os.rename(self.incoming, target)
        fsync_dir(self.root)
        return target

    def inactive_slot(self, pointer: Pointer | None) -> Slot:
        active = pointer.active.slot if pointer is not None else None
        if active is not None:
            return "b" if active == "a" else "a"
        fallback = pointer.fallback.slot if pointer and pointer.fallback else None
        return "b" if fallback == "a" else "a"

    def local_files(self, active: Active) -> dict[str, Path]:
        """sha256 -> a file already on this device (the active release's, or the builtin's):
        a release that keeps a file (the audio front ends) needs no download for it."""
        out: dict[str, Path] = {}
        if active.body is not None and active.ref.slot is not None:
            base = self.slot_dir(active.ref.slot)
            for f in active.body.files:
                out[f.sha256] = base / f.path
        builtin_dir = self.builtin_manifest.parent
        candidates = [p for p in builtin_dir.iterdir() if p.is_file()]
        with contextlib.suppress(ValueError, KeyError, OSError, TypeError):
            data = json.loads(self.builtin_manifest.read_text())
            candidates += [builtin_dir / s["model"] for s in data["stages"]]
        for p in candidates:
            with contextlib.suppress(OSError):
                digest, _ = file_digest(p)
                out.setdefault(digest, p)
        return out


def copy_verified(src: Path, dest: Path, sha256: str, length: int) -> bool:
    """Copy ``src`` to ``dest`` (0600, fsynced) if it has this hash and length; False if not."""
    h = hashlib.sha256()
    fd = open_private(dest, os.O_WRONLY | os.O_TRUNC)
    try:
        with open(src, "rb") as f:
            n = 0
            while chunk := f.read(1 << 16):
                h.update(chunk)
                n += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if n != length or h.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        return False
    return True
