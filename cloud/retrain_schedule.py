"""The worker's scheduled retrain and rollout upkeep (docs/model-updates.md, Scheduled retrain).

Every ``[training] retrain_every_hours`` the worker looks, per model of ``retrain_models``, at the
usable examples (a target and a weight above 0) that arrived since that model's last round; with
at least ``retrain_min_new_examples`` it runs one round, publishes an accepted candidate (canary
stage) when ``retrain_publish``, and logs ``worker.retrain_done`` with the decision.

Why a subprocess (``python -m edgekeeper.cli cloud retrain``) and not ``asyncio.to_thread``: a
round imports TensorFlow (about 1 GB resident) and trains for a minute or more on every core.
In a child process that memory goes back when the round ends, a crash in TensorFlow (an OOM
kill, an abort in a kernel) cannot take the worker and the events it holds with it, and the
round's Python-side work never competes with the event loop for the GIL. The child reads the
same config (the file ``config.source`` and the inherited environment). The candidate's
``retrain.json`` carries the decision back; publishing needs no TensorFlow and runs here.

One worker of many: a round runs under a lease that only one process can hold and that dies
with its holder, so a crashed worker never blocks the next round: PostgreSQL's session advisory
lock (``PostgresStore.try_session_lock``) across hosts, and for the SQLite store (one host by
design) an exclusive ``flock`` on ``<data_dir>/retrain.lock``. A worker that does not get it
skips that round. The newest example each model's last round saw is kept in
``<data_dir>/retrain-state.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from edgekeeper import runtime
from edgekeeper.config import Config
from edgekeeper.fs import private_dir, write_private
from edgekeeper.log import get_logger
from edgekeeper.metrics import WorkerMetrics
from edgekeeper.protocol.release import Scope

log = get_logger(__name__)

RETRAIN_LOCK = 0x65646B7302  # "edks" 2: the advisory lock key (1 is the schema's)
STATE_FILE = "retrain-state.json"
LOCK_FILE = "retrain.lock"
# Canary-stage releases are evaluated this often, so one is promoted (or halted) even when no
# device polls the ingest.
ROLLOUT_EVERY_S = 60.0


def have_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


@contextlib.asynccontextmanager
async def retrain_lease(store: Any, data_dir: Path) -> AsyncIterator[bool]:
    """True inside when this process holds the retrain lease (module docstring)."""
    lock = getattr(store, "try_session_lock", None)
    if lock is not None:
        async with lock(RETRAIN_LOCK) as got:
            yield got
        return

    def take() -> int | None:
        fd = os.open(private_dir(data_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    fd = await asyncio.to_thread(take)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the flock


def _read_state(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}  # none yet, or unreadable: every model counts from the beginning
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def _write_state(path: Path, state: dict[str, float]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_private(tmp, json.dumps(state, sort_keys=True).encode())
    os.replace(tmp, path)


def retrain_command(config: Config, model: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "edgekeeper.cli"]
    if config.source != "defaults":
        cmd += ["--config", config.source]
    return [*cmd, "cloud", "retrain", "--model", model, "--out", str(out)]


class RetrainScheduler:
    """Owns the worker's retrain task: one round per model when enough examples came in."""

    def __init__(self, config: Config, store: Any, *,
                 clock: Callable[[], float] = time.time,
                 metrics: WorkerMetrics | None = None) -> None:
        self.metrics = metrics  # the worker's: rounds by decision, the last round's time
        self.config = config
        self.store = store
        self.clock = clock
        self.data_dir = config.cloud_data_dir
        self.rounds: list[dict[str, Any]] = []  # what each round decided (for the demo, tests)

    async def run(self, stop: asyncio.Event) -> None:
        every = self.config.training.retrain_every_hours * 3600
        if every <= 0:
            return
        if not have_tensorflow():
            log.warning("worker.retrain_unavailable", reason="scheduled retraining needs the "
                        "train extra", fix="pip install 'edgekeeper[train]'")
            return
        while not stop.is_set():
            try:
                await self.round(stop)
            except Exception as err:  # a failed round must not stop the worker: next period
                log.warning("worker.retrain_failed", error=repr(err)[:300],
                            retry_in_s=round(every))
            if await runtime.sleep(stop, every):
                return

    async def new_examples(self, model: str, mark: float | None) -> tuple[int, float | None]:
        """Usable examples reasoned after ``mark``, and the newest ``reasoned_at`` seen. The
        mark is the examples' own time, not this host's clock: workers on several hosts (or a
        clock that jumps) still count each example once."""
        usable, newest = await self.store.count_new_examples(
            model=model, scope=Scope.parse("fleet"), after=mark)
        return usable, mark if newest is None else newest

    async def round(self, stop: asyncio.Event) -> None:
        """One check of every model, under the lease."""
        async with retrain_lease(self.store, self.data_dir) as mine:
            if not mine:
                log.info("worker.retrain_skipped", reason="another worker holds the lease")
                return
            state_path = private_dir(self.data_dir) / STATE_FILE
            state = await asyncio.to_thread(_read_state, state_path)
            for model in self.config.training.retrain_models:
                if stop.is_set():
                    return
                new, newest = await self.new_examples(model, state.get(model))
                need = self.config.training.retrain_min_new_examples
                if new < need:
                    log.info("worker.retrain_waiting", model=model, new_examples=new, needed=need)
                    continue
                done = await self.retrain(model, stop)
                if done is None:
                    return  # stopped while it ran
                if newest is not None:
                    state[model] = newest
                await asyncio.to_thread(_write_state, state_path, state)
                self.rounds.append(done)
                if self.metrics is not None:
                    decision = ("published" if done["published"] else
                                "accepted" if done["accepted"] else "refused")
                    self.metrics.retrain_rounds.labels(model=model, decision=decision).inc()
                    self.metrics.retrain_last.labels(model=model).set(self.clock())
                log.info("worker.retrain_done", **done)

    async def retrain(self, model: str, stop: asyncio.Event) -> dict[str, Any] | None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock()))
        out = private_dir(self.data_dir / "candidates") / f"{model}-fleet-{stamp}"
        proc = await asyncio.create_subprocess_exec(
            *retrain_command(self.config, model, out), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output = asyncio.ensure_future(proc.communicate())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({output, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not output.done():  # stopping: the round is abandoned, its folder never renamed in
            proc.terminate()
            await output
            log.info("worker.retrain_stopped", model=model)
            return None
        text = (output.result()[0] or b"").decode("utf-8", "replace")
        report_path = out / "retrain.json"
        if proc.returncode != 0 or not report_path.is_file():
            raise RuntimeError(f"retrain {model} exited {proc.returncode}: {text[-300:]}")
        report = json.loads(await asyncio.to_thread(report_path.read_text, "utf-8"))
        decision = report.get("decision", {})
        done: dict[str, Any] = {"model": model, "accepted": bool(decision.get("accepted")),
                                "reason": str(decision.get("reason", "")),
                                "candidate": str(out), "published": None}
        if done["accepted"] and self.config.training.retrain_publish:
            from edgekeeper.cloud.retrain_cli import publish_candidate

            p = await publish_candidate(self.store, self.config, out)
            done["published"] = f"{p.model}@{p.version} {p.stage or 'unsigned (key offline)'}"
            done["release"] = str(p.folder)
        return done


async def rollouts(config: Config, store: Any, stop: asyncio.Event,
                   clock: Callable[[], float] = time.time) -> None:
    """Evaluate canary-stage releases every ROLLOUT_EVERY_S (idempotent, so every worker may)."""
    from edgekeeper.cloud.releases import evaluate_rollouts

    while not stop.is_set():
        try:
            await evaluate_rollouts(store, now=clock(),
                                    canary_seconds=config.cloud.rollout_canary_seconds)
        except Exception as err:  # the store away: housekeeping tries again next time
            log.warning("worker.rollouts_failed", error=repr(err)[:300])
        if await runtime.sleep(stop, ROLLOUT_EVERY_S):
            return
