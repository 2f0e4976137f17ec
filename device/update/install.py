"""The disk side of an update, in the order that keeps a power cut harmless.

``download`` fills ``incoming/`` (files reused or fetched, release.json last, then the whole
folder verified); ``commit`` moves it over the inactive slot and then writes the pointer (in
trial); ``passed`` marks it good. Nothing here loads a model: the updater shadow-evaluates
between ``download`` and ``commit`` and swaps the gate after it. The kill test
(tests/test_update_kill.py) runs exactly these steps under SIGKILL.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from edgekeeper import runtime
from edgekeeper.backoff import Backoff
from edgekeeper.device.update.fetch import ReleaseFetcher
from edgekeeper.device.update.store import (
    Active,
    ModelStore,
    Pointer,
    Ref,
    Trial,
    copy_verified,
    fsync_dir,
)
from edgekeeper.errors import RetryableError
from edgekeeper.fs import private_dir, write_private
from edgekeeper.log import get_logger
from edgekeeper.protocol.release import RELEASE_FILE, ReleaseBody

log = get_logger(__name__)


async def download(store: ModelStore, fetcher: ReleaseFetcher, active: Active,
                   body: ReleaseBody, raw: bytes, sha: str, *, attempts: int, backoff: Backoff,
                   stop: asyncio.Event) -> Path:
    """Fill ``incoming/`` with the release; return its entry manifest. Raises ReleaseRefused
    (a file is not the signed one) or, after ``attempts`` tries of a file, RetryableError."""
    incoming = await asyncio.to_thread(store.empty_incoming)
    local = await asyncio.to_thread(store.local_files, active)
    fetched = reused = 0
    for entry in body.files:
        dest = incoming / entry.path
        await asyncio.to_thread(private_dir, dest.parent)
        src = local.get(entry.sha256)
        if src is not None and await asyncio.to_thread(
                copy_verified, src, dest, entry.sha256, entry.length):
            reused += 1
            continue
        for attempt in range(1, attempts + 1):
            try:
                await fetcher.download(store.model, body.version, entry, dest)
                break
            except RetryableError as err:
                if attempt == attempts:
                    log.warning("update.download_failed", model=store.model,
                                version=body.version, file=entry.path, error=err.message[:300])
                    raise
                delay = backoff.next_delay(getattr(err, "retry_after", None))
                log.info("update.download_retry", model=store.model, file=entry.path,
                         attempt=attempt, error=err.message[:200], seconds=round(delay, 2))
                if await runtime.sleep(stop, delay):
                    raise
        fetched += 1
    backoff.reset()
    await asyncio.to_thread(_seal, incoming, raw)
    await asyncio.to_thread(store.verify_dir, incoming, sha)
    log.info("update.downloaded", model=store.model, version=body.version, fetched=fetched,
             reused=reused)
    return incoming / body.entry


def _seal(directory: Path, raw: bytes) -> None:
    """release.json goes in last: a folder with one has every file (verify_dir checks)."""
    write_private(directory / RELEASE_FILE, raw)
    fsync_dir(directory)


def commit(store: ModelStore, active: Active, body: ReleaseBody, sha: str,
           now: float) -> tuple[Pointer, Path]:
    """Install ``incoming/`` as the inactive slot, then point at it, in trial (blocking).

    The fallback is the running model if it is good (a model still in trial never is: its own
    fallback stays). Returns the new pointer and the manifest to swap to."""
    before = active.pointer
    slot = store.inactive_slot(before)
    fallback = active.ref if before is None or before.trial is None else before.fallback
    pointer = Pointer(active=Ref(slot, body.version, body.created_at, sha), trial=Trial(now),
                      fallback=fallback, rejected=before.rejected if before else ())
    directory = store.install(slot)
    return store.write_pointer(pointer), directory / body.entry


def passed(store: ModelStore, pointer: Pointer) -> Pointer:
    """The trial is over and good (blocking)."""
    return store.write_pointer(replace(pointer, trial=None))

