"""Child of tests/test_update_kill.py: a device that downloads and swaps releases in a loop.

It runs as a zygote: it imports once (seconds on a loaded board), then forks one device per
``go`` line read from stdin and prints its pid; the test SIGKILLs that device at a random moment
and sends ``reap PID``. Forking from this single-threaded process is safe, and 50 kills take
seconds instead of 50 interpreter starts.

The device runs exactly the updater's disk steps (device/update/install.py): recover at start,
then fetch release.json, verify it, check_update, download into incoming/, commit (install +
pointer in trial), pass the trial; again and again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from pathlib import Path

from edgekeeper.backoff import Backoff
from edgekeeper.device.update import install
from edgekeeper.device.update.fetch import ReleaseFetcher
from edgekeeper.device.update.store import Active, ModelStore
from edgekeeper.protocol.keys import DeviceKeys
from edgekeeper.protocol.release import InputSpec, check_update, verify

DEVICE_ID = "kill-device"


async def device(state: Path, url: str, release_pk: bytes, keys_dir: Path,
                 builtin: Path) -> None:
    store = ModelStore(state, "person", release_pk=release_pk, builtin_manifest=builtin,
                       builtin_version="1.1.0")
    active = store.recover()
    keys = DeviceKeys.load(keys_dir)
    spec = InputSpec("vision", width=160, height=120, color="rgb")
    async with ReleaseFetcher(url, keys=keys, device_id=DEVICE_ID, stall_seconds=5.0,
                              deadline_seconds=30.0) as fetcher:
        while True:
            got = await fetcher.release("person", None)
            assert got is not None
            raw = got[0]
            sha = hashlib.sha256(raw).hexdigest()
            body = verify(raw, release_pk)
            check_update(body, model="person", input=spec, running_version=active.ref.version,
                         running_created_at=active.ref.release_created_at,
                         runtime_version="99.0.0")
            await install.download(store, fetcher, active, body, raw, sha, attempts=1,
                                   backoff=Backoff(0.0, 0.0), stop=asyncio.Event())
            pointer, manifest = install.commit(store, active, body, sha, time.time())
            pointer = install.passed(store, pointer)
            active = Active(pointer.active, manifest, body, pointer)


def main() -> None:
    state, url, pk_hex, keys_dir, builtin = sys.argv[1:6]
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd == ["go"]:
            pid = os.fork()
            if pid == 0:
                # The pipe to the test carries pids only: the device's log goes nowhere.
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                try:
                    asyncio.run(device(Path(state), url, bytes.fromhex(pk_hex), Path(keys_dir),
                                       Path(builtin)))
                finally:
                    os._exit(1)
            print(pid, flush=True)
        elif cmd and cmd[0] == "reap":
            _, status = os.waitpid(int(cmd[1]), 0)
            print(f"reaped {status}", flush=True)


if __name__ == "__main__":
    main()
