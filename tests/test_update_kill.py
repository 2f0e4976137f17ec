"""SIGKILL at random moments while a device downloads and swaps models, 50 times: after every
restart exactly one model is active and it passes its hash check (device/update/store.py).

The device is a fork of tests/update_child.py (see there); the releases come from a real
aiohttp server on 127.0.0.1 that publishes a new signed version of the person model on every
request (each with a model file of its own, so every round really downloads), slowed to 16 KiB
per 20 ms so kills land inside downloads as well as around installs and pointer writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web
from nacl.signing import SigningKey

from edgekeeper.config import MODELS_DIR
from edgekeeper.device.manifest import load_manifest
from edgekeeper.device.update.store import ModelStore
from edgekeeper.protocol.keys import DeviceKeys
from edgekeeper.protocol.release import RELEASE_FILE, verify_files
from tests.update_kit import ReleaseServer, build_release

KILLS = 50
ROOT = Path(__file__).resolve().parent.parent


class EverNewer(ReleaseServer):
    """Publishes person@1.N.0, N one higher on every release.json request."""

    def __init__(self, tmp: Path, key: SigningKey, *devices: Any) -> None:
        super().__init__(*devices)
        self.tmp, self.key, self.n = tmp, key, 1

    async def _release(self, request: web.Request) -> web.StreamResponse:
        self.n += 1
        version = f"1.{self.n}.0"
        model = self.tmp / "models" / f"{version}.tflite"
        folder = await asyncio.to_thread(self._build, version, model)
        self.publish("person", folder)
        return await super()._release(request)

    def _build(self, version: str, model: Path) -> Path:
        model.parent.mkdir(exist_ok=True)
        model.write_bytes((MODELS_DIR / "person" / "person-int8.tflite").read_bytes()
                          + version.encode())
        return build_release(self.tmp / "releases" / version, "person", version, self.key,
                             model_file=model)


def _check_exactly_one_verified(store: ModelStore) -> tuple[str, str]:
    """The restart: recover, then check what it chose independently of it."""
    active = store.recover()
    pointer = store.read_pointer()
    if active.ref.slot is None:
        assert active.manifest == store.builtin_manifest
    else:
        assert pointer is not None and pointer.active == active.ref
        slot = store.slot_dir(active.ref.slot)
        raw = (slot / RELEASE_FILE).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == active.ref.release_sha256
        assert active.body is not None
        verify_files(active.body, slot)  # raises unless every file has its length and hash
    manifest = load_manifest(active.manifest)
    assert manifest.version == active.ref.version
    return active.ref.label, active.ref.version


def test_sigkill_during_download_and_swap_leaves_exactly_one_verified_model(
        tmp_path: Path) -> None:
    key = SigningKey.generate()
    keys = DeviceKeys.generate()
    keys.save(tmp_path / "keys")
    server = EverNewer(tmp_path, key, keys.public("kill-device"))
    server.chunk_delay = 0.02
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    url = asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    builtin = MODELS_DIR / "person" / "manifest-int8.json"
    store = ModelStore(tmp_path / "state", "person", release_pk=bytes(key.verify_key),
                       builtin_manifest=builtin, builtin_version="1.1.0")
    zygote = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "update_child.py"), str(tmp_path / "state"), url,
         bytes(key.verify_key).hex(), str(tmp_path / "keys"), str(builtin)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert zygote.stdin is not None and zygote.stdout is not None
    rng = random.Random(11)
    seen: Counter[str] = Counter()
    versions = []
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for _ in range(KILLS):
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            threading.Event().wait(rng.uniform(0.05, 0.6))
            os.kill(pid, signal.SIGKILL)
            zygote.stdin.write(f"reap {pid}\n")
            zygote.stdin.flush()
            status = zygote.stdout.readline().split()
            assert status[0] == "reaped" and os.WIFSIGNALED(int(status[1])), status
            # Where the kill landed, as the disk shows it.
            incoming = store.incoming
            if incoming.exists() and not (incoming / RELEASE_FILE).exists():
                seen["mid_download"] += 1
            pointer = store.read_pointer()
            if pointer is not None and pointer.trial is not None:
                seen["after_commit"] += 1
            slot, version = _check_exactly_one_verified(store)
            seen[slot] += 1
            versions.append(tuple(int(x) for x in version.split(".")))
    finally:
        zygote.kill()
        zygote.wait()
        zygote.stdin.close()
        zygote.stdout.close()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    # The device made progress between kills, and kills landed inside downloads.
    assert max(versions) > (1, 3, 0), (versions, seen)
    assert seen["mid_download"] >= 1, seen
    print(f"kills: {KILLS}, where: {dict(seen)}, last version: {versions[-1]}")
