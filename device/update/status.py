"""``edgekeeper device models``: which model each gate runs, what each slot holds, the trial."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from edgekeeper.config import Config
from edgekeeper.device.update.store import SLOTS, ModelStore
from edgekeeper.errors import ConfigError
from edgekeeper.protocol.release import ReleaseRefused


def describe(config: Config) -> list[dict[str, Any]]:
    """One entry per model family with a store under ``<state_dir>/models`` (blocking)."""
    from edgekeeper.device import identity

    state = config.device.state_dir
    try:
        release_pk: bytes | None = identity.load_enrollment(state, config.device.id
                                                            ).cloud.release_pk
    except ConfigError:
        release_pk = None  # not enrolled: slots are listed, not verified
    root = Path(state) / "models"
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        store = ModelStore(state, folder.name, release_pk=release_pk or bytes(32),
                           builtin_manifest=Path(), builtin_version="builtin")
        pointer = store.read_pointer()
        doc: dict[str, Any] = {
            "model": folder.name,
            "active": pointer.active.label if pointer else "builtin",
            "version": pointer.active.version if pointer else None,
            "trial": None,
            "fallback": (pointer.fallback.label if pointer and pointer.fallback else "builtin"),
            "slots": {},
        }
        if pointer is not None and pointer.trial is not None:
            doc["trial"] = {"started_at": pointer.trial.started_at, "boots": pointer.trial.boots,
                            "age_seconds": round(time.time() - pointer.trial.started_at, 1)}
        for slot in SLOTS:
            doc["slots"][slot] = _slot(store, slot, release_pk is not None)
        out.append(doc)
    return out


def _slot(store: ModelStore, slot: str, check: bool) -> dict[str, Any]:
    directory = store.slot_dir(slot)  # type: ignore[arg-type]  # slot is one of SLOTS
    if not directory.exists():
        return {"state": "empty"}
    if not check:
        return {"state": "unverified (not enrolled)"}
    try:
        body = store.verify_dir(directory)
    except (ReleaseRefused, OSError) as err:
        return {"state": "damaged", "error": str(err)}
    return {"state": "verified", "version": body.version, "created_at": body.created_at}


def cmd_models(args: argparse.Namespace, config: Config) -> int:
    docs = describe(config)
    if args.json:
        print(json.dumps(docs, indent=2, sort_keys=True))
        return 0
    if not docs:
        print("no model updates yet: every gate runs its builtin model")
    for d in docs:
        trial = (f", in trial since {d['trial']['age_seconds']:g} s ({d['trial']['boots']} "
                 "starts)" if d["trial"] else "")
        print(f"{d['model']}: runs {d['active']} {d['version'] or ''}{trial}; "
              f"falls back to {d['fallback']}")
        for slot, s in d["slots"].items():
            extra = s.get("version") or s.get("error") or ""
            print(f"  slot-{slot}: {s['state']} {extra}".rstrip())
    return 0
