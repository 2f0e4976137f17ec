"""Model updates on the device: signed releases verified, shadow-evaluated, swapped, trialled
and rolled back (docs/model-updates.md, "On the device").

* ``store``   - two slots and the pointer per model family; recovery at start;
* ``fetch``   - the signed HTTP client of the release endpoints (length cap, stall timeout);
* ``canary``  - the ring of recent gate inputs and the shadow evaluation;
* ``updater`` - one family's loop: check, download, shadow, swap, trial, rollback, reports.

``Updates`` owns them for ``edgekeeper run``: ``prepare`` (before the gates load) resolves the
model each gate must load, ``attach`` hooks the updaters to the loaded gates and the cloud link,
``run`` is one task of the device's TaskGroup.

Only a gate configured as ``builtin:NAME`` is updated: a manifest path in the config is the
operator's own choice and is loaded as it is; whatever arrives over the network is loaded only
after release verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from edgekeeper import compat
from edgekeeper.config import Config, resolve_model
from edgekeeper.device.manifest import load_manifest
from edgekeeper.device.update.store import Active, ModelStore
from edgekeeper.log import get_logger

log = get_logger(__name__)

__all__ = ["Updates", "parse_hint"]


def parse_hint(value: str) -> dict[str, str]:
    """``person=1.2.0,sound=1.1.0`` -> {"person": "1.2.0", "sound": "1.1.0"} (junk ignored)."""
    out = {}
    for part in value.split(","):
        name, sep, version = part.strip().partition("=")
        if sep and name and version:
            out[name.strip()] = version.strip()
    return out


def _stores(config: Config, release_pk: bytes) -> dict[str, tuple[ModelStore, Active]]:
    """modality -> (store, recovered model) for each gate this device runs and updates."""
    out = {}
    wanted = (("vision", config.camera.enabled, config.gate.vision_model),
              ("audio", config.microphone.enabled, config.gate.audio_model))
    for modality, enabled, spec in wanted:
        if not enabled:
            continue
        if not spec.startswith("builtin:"):
            log.info("update.not_managed", modality=modality, model=spec,
                     why="a manifest path in the config is the operator's choice")
            continue
        builtin = resolve_model(spec, config.gate.variant)
        store = ModelStore(config.device.state_dir, spec.split(":", 1)[1], release_pk=release_pk,
                           builtin_manifest=builtin,
                           builtin_version=load_manifest(builtin).version)
        out[modality] = (store, store.recover())
    return out


class Updates:
    """Every model family's updater on one device."""

    def __init__(self, config: Config, stores: dict[str, tuple[ModelStore, Active]],
                 cloud_url: str, keys: Any) -> None:
        self.original = config
        self.stores = stores
        self.cloud_url = cloud_url
        self.keys = keys
        self.updaters: dict[str, Any] = {}
        self.ring: Any = None
        self._stack = contextlib.AsyncExitStack()
        self.fetcher: Any = None

    @classmethod
    async def prepare(cls, config: Config) -> Updates | None:
        """None when updates are off or the device is not enrolled (no pinned release key)."""
        if not config.updates.enabled:
            return None
        from edgekeeper.device import identity
        from edgekeeper.errors import ConfigError

        try:
            enrollment = await asyncio.to_thread(identity.load_enrollment,
                                                 config.device.state_dir, config.device.id)
            keys = await asyncio.to_thread(identity.load_keys, config.device.state_dir)
        except ConfigError:
            return None
        stores = await asyncio.to_thread(_stores, config, enrollment.cloud.release_pk)
        for modality, (_, active) in stores.items():
            log.info("update.model_resolved", modality=modality, model=active.ref.version,
                     slot=active.ref.label, manifest=str(active.manifest),
                     trial=active.pointer is not None and active.pointer.trial is not None)
        return cls(config, stores, config.uplink.cloud_url or enrollment.cloud_url, keys)

    @property
    def config(self) -> Config:
        """The config with each updated gate pointed at the model recovered at start."""
        gate = self.original.gate
        for modality, (_, active) in self.stores.items():
            if modality == "vision":
                gate = dataclasses.replace(gate, vision_model=str(active.manifest))
            else:
                gate = dataclasses.replace(gate, audio_model=str(active.manifest))
        return dataclasses.replace(self.original, gate=gate)

    async def __aenter__(self) -> Updates:
        from edgekeeper.device.update.canary import CanaryRing
        from edgekeeper.device.update.fetch import ReleaseFetcher
        from edgekeeper.tls import client_context

        c = self.original
        try:
            self.fetcher = await self._stack.enter_async_context(ReleaseFetcher(
                self.cloud_url, keys=self.keys, device_id=c.device.id,
                stall_seconds=c.updates.stall_seconds,
                deadline_seconds=c.updates.download_seconds,
                connect_timeout=c.uplink.connect_timeout_seconds,
                ssl_context=client_context(c.uplink.ca_file)))
            self.ring = await CanaryRing(
                c.device.state_dir / "canary.sqlite", size=c.updates.canary_size,
                thresholds={k: r.threshold for k, r in c.trigger.labels.items() if r.enabled},
            ).open()
            self._stack.push_async_callback(self.ring.close)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def attach(self, gates: Any, link: Any = None, models: dict[str, str] | None = None) -> None:
        """Hook an updater to each loaded gate; ``models`` (the capture's modality -> tag) is
        kept current across swaps so events name the model that judged them."""
        from edgekeeper.device.update.updater import Updater

        c = self.original
        thresholds = {k: r.threshold for k, r in c.trigger.labels.items() if r.enabled}
        for modality, (store, active) in self.stores.items():
            gate = getattr(gates, modality)
            if gate is None:
                continue

            def swapped(tag: str, modality: str = modality) -> None:
                if models is not None:
                    models[modality] = tag

            self.updaters[store.model] = Updater(
                store=store, gate=gate, fetcher=self.fetcher, active=active, settings=c.updates,
                ring=self.ring, thresholds=thresholds, on_swapped=swapped)
        results = getattr(link, "results", None)
        if results is not None:
            results.on_releases = self.hint
        actions = getattr(link, "actions", None)
        if actions is not None:
            actions.actions.append(("canary", self._note_result))

    def hint(self, value: str) -> None:
        for model, version in parse_hint(value).items():
            updater = self.updaters.get(model)
            if updater is not None:
                updater.hint(version)

    def on_event(self, event: Any) -> None:
        if self.ring is not None:
            self.ring.event_opened(event.modality, event.seq)

    async def _note_result(self, doc: dict[str, Any]) -> None:
        if self.ring is not None and isinstance(doc.get("seq"), int) and not doc.get(
                "provisional"):
            await self.ring.note_result(doc["seq"], str(doc.get("label", "")),
                                        doc.get("gate_correct"))

    async def run(self, stop: asyncio.Event) -> None:
        async with compat.TaskGroup() as tg:
            if self.ring is not None:
                tg.create_task(self.ring.run(stop), name="update-canary")
            for model, updater in self.updaters.items():
                tg.create_task(updater.run(stop), name=f"update-{model}")


def state_dir_models(state_dir: Path) -> list[Path]:
    root = Path(state_dir) / "models"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
