"""One model family's updates on a running device: check, download, shadow, swap, trial.

``Updater.run`` is one task of the device's TaskGroup. It asks for the family's release every
``updates.check_seconds`` (sooner when the results long-poll's ``Edgekeeper-Releases`` hint names
a version other than the running one) and, for a release that passes every rule of
``protocol/release.check_update`` before a single file is fetched:

1. downloads its files into ``incoming/`` (a file the running release or the builtin model
   already has, by sha256, is copied instead), then verifies the folder whole;
2. shadow-evaluates it against the running model on the canary set (canary.py);
3. moves it over the inactive slot, writes the pointer (in trial) and swaps the gate between two
   inferences (``Gate.swap``: no frame is dropped);
4. watches the trial: ``trial_inferences`` inferences or ``trial_seconds``, whichever comes
   first, without a regression; then the model is good. A regression rolls back to the last
   good model at once. Regressions: an inference that raises, a non-finite score, or (after
   ``_RATE_MIN_INFERENCES`` inferences) a hit rate, the share of inferences with some label at
   or above its trigger threshold, above ``max(3 x``, ``+0.2 over)`` the previous model's rate
   over its last ``_BASELINE`` inferences. A crash loop is caught at start (store.py).

Every refusal is logged (``update.refused``, with the reason) and reported to the cloud; a
refusal never touches the running model or either slot (downloads only ever write
``incoming/``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekeeper import __version__, compat, runtime
from edgekeeper.backoff import Backoff
from edgekeeper.config import UpdatesSection
from edgekeeper.device.gate import Gate, GateOutput
from edgekeeper.device.update import install
from edgekeeper.device.update.canary import (
    CanaryInput,
    CanaryRing,
    sample_inputs,
    shadow_evaluate,
)
from edgekeeper.device.update.fetch import ReleaseFetcher, ReleasesRefused
from edgekeeper.device.update.store import (
    Active,
    ModelStore,
    Pointer,
)
from edgekeeper.errors import EdgekeeperError, RetryableError
from edgekeeper.log import get_logger
from edgekeeper.protocol.release import (
    InputSpec,
    ReleaseBody,
    ReleaseRefused,
    check_update,
    parse_version,
    verify,
)

log = get_logger(__name__)

_BASELINE = 500  # the previous model's last inferences the trial's hit rate is compared with
_RATE_MIN_INFERENCES = 50
_RATE_FACTOR, _RATE_MARGIN = 3.0, 0.2


@dataclass
class _TrialState:
    tag: str
    started_at: float  # wall clock, as in the pointer
    baseline: float | None  # the previous model's hit rate (None after a restart)
    inferences: int = 0
    hits: int = 0
    failed: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Updater:
    def __init__(self, *, store: ModelStore, gate: Gate, fetcher: ReleaseFetcher,
                 active: Active, settings: UpdatesSection, ring: CanaryRing | None = None,
                 thresholds: Mapping[str, float] | None = None,
                 on_swapped: Callable[[str], Any] | None = None,
                 runtime_version: str = __version__, clock: Callable[[], float] = time.time,
                 ) -> None:
        self.store = store
        self.gate = gate
        self.fetcher = fetcher
        self.active = active
        self.settings = settings
        self.ring = ring
        self.thresholds = dict(thresholds or {})
        self.on_swapped = on_swapped
        self.runtime_version = runtime_version
        self.clock = clock
        self.family = store.model
        self.etag: str | None = None
        self.wake = asyncio.Event()
        self.backoff = Backoff(5.0, max(5.0, settings.check_seconds))
        self._file_backoff = Backoff(1.0, 30.0)
        self._seen: set[str] = set()  # release.json sha256 refused during this run
        self._reports: deque[tuple[str, str, str, float]] = deque(maxlen=64)
        self._baseline: deque[bool] = deque(maxlen=_BASELINE)
        self._trial: _TrialState | None = None
        self._hinted = ""
        for version, outcome, reason in active.reports:
            self._reports.append((version, outcome, reason, clock()))
        if active.pointer is not None and active.pointer.trial is not None:
            self._trial = _TrialState(f"{self.family}@{active.ref.version}",
                                      active.pointer.trial.started_at, None)
        gate.observers.append(self._observe)

    # -- what the gate sees ------------------------------------------------------------------
    def _hit(self, scores: Mapping[str, float]) -> bool:
        return any(s >= self.thresholds.get(k, 0.5) for k, s in scores.items())

    def _observe(self, data: Any, fut: asyncio.Future[GateOutput]) -> None:
        """Every inference's outcome (a done-callback on the event loop: keep it cheap)."""
        if fut.cancelled():
            return
        trial = self._trial
        err = fut.exception()
        if err is not None:
            if trial is not None and trial.failed is None:
                trial.failed = f"error: {type(err).__name__}: {err}"[:300]
                trial.done.set()
            return
        out = fut.result()
        if self.ring is not None:
            rate = self.gate.manifest.audio.sample_rate if self.gate.manifest.audio else 0
            self.ring.offer(self.gate.modality, data, out, rate)
        hit = self._hit(out.scores)
        if trial is None or out.model != trial.tag:
            self._baseline.append(hit)
            return
        trial.inferences += 1
        trial.hits += hit
        if trial.failed is None:
            bad = [k for k, s in out.scores.items() if not math.isfinite(s)]
            if bad:
                trial.failed = f"non_finite: {bad[0]} scored {out.scores[bad[0]]}"
            elif (trial.baseline is not None and trial.inferences >= _RATE_MIN_INFERENCES
                  and trial.hits / trial.inferences
                  > max(_RATE_FACTOR * trial.baseline, trial.baseline + _RATE_MARGIN)):
                trial.failed = (f"trigger_rate: {trial.hits / trial.inferences:.2f} of "
                                f"inferences hit, the previous model {trial.baseline:.2f}")
        if trial.failed is not None or trial.inferences >= self.settings.trial_inferences:
            trial.done.set()

    def hint(self, version: str) -> None:
        """The results long-poll says the cloud publishes ``version``: look now if it differs."""
        self._hinted = version
        if version != self.active.ref.version:
            self.wake.set()

    @property
    def in_trial(self) -> bool:
        return self._trial is not None

    # -- the loop ----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._flush_reports()
            if self._trial is not None:
                left = self._trial.started_at + self.settings.trial_seconds - self.clock()
                if not self._trial_due() and await runtime.sleep(
                        stop, max(0.0, left), wake=self._trial.done):
                    break
                await self.finish_trial()
                continue
            self.wake.clear()  # a hint from now on wakes the sleep below
            delay = await self._check_until_stopped(stop)
            if self._trial is None:
                await runtime.sleep(stop, delay, wake=self.wake)

    async def _check_until_stopped(self, stop: asyncio.Event) -> float:
        """One ``check_once``, cut short by a stop (a download may take minutes; the drain
        must not wait for it: what it leaves in incoming/ is never loaded). Returns the wait
        before the next check."""
        delay = [self.settings.check_seconds]

        async def check() -> None:
            try:
                await self.check_once(stop)
                self.backoff.reset()
            except ReleasesRefused as err:
                log.error("update.check_refused", model=self.family, error=err.message,
                          fix=err.fix)
            except RetryableError as err:
                delay[0] = self.backoff.next_delay(getattr(err, "retry_after", None))
                log.warning("update.check_failed", model=self.family, error=err.message[:300],
                            seconds=round(delay[0], 1))

        async def cut_short(checking: asyncio.Task[None]) -> None:
            await stop.wait()
            checking.cancel()

        async with compat.TaskGroup() as tg:
            checking = tg.create_task(check(), name=f"update-check-{self.family}")
            watcher = tg.create_task(cut_short(checking), name=f"update-stop-{self.family}")
            checking.add_done_callback(lambda _: watcher.cancel())
        return delay[0]

    async def check_once(self, stop: asyncio.Event | None = None) -> str:
        """One look at the cloud's release. Returns what happened: "none", "unchanged",
        "refused", "shadow_failed", "swapped" (a transient failure raises RetryableError)."""
        stop = stop or asyncio.Event()
        if self._trial is not None:
            return "in_trial"  # the slot a download would replace is the trial's fallback
        got = await self.fetcher.release(self.family, self.etag)
        if got is None:
            return "none"
        raw, etag = got
        sha = hashlib.sha256(raw).hexdigest()
        pointer = self.active.pointer
        if (sha == self.active.ref.release_sha256 or sha in self._seen
                or (pointer is not None and sha in pointer.rejected)):
            self.etag = etag
            return "unchanged"
        body: ReleaseBody | None = None
        try:
            body = verify(raw, self.store.release_pk)
            check_update(body, model=self.family, input=self._input_spec(),
                         running_version=self.active.ref.version,
                         running_created_at=self.active.ref.release_created_at,
                         runtime_version=self.runtime_version, now=self.clock())
            candidate = await self._download(body, raw, sha, stop)
        except ReleaseRefused as err:
            self._seen.add(sha)
            self.etag = etag
            await self._refused(body.version if body else _claimed_version(raw, self._hinted),
                                err.reason, err.message)
            return "refused"
        self.etag = etag
        await self._report(body.version, "downloaded", "")
        shadow = await self._shadow(candidate, body)
        if shadow is not None:
            self._seen.add(sha)
            self.active = replace(self.active, pointer=await asyncio.to_thread(
                self.store.reject, self.active.pointer, sha))
            log.error("update.shadow_failed", model=self.family, version=body.version,
                      reason=shadow)
            await self._report(body.version, "shadow_failed", shadow)
            return "shadow_failed"
        await self._swap(body, sha)
        return "swapped"

    def _input_spec(self) -> InputSpec:
        m = self.gate.manifest
        if m.audio is not None:
            return InputSpec("audio", sample_rate=m.audio.sample_rate,
                             window_seconds=m.audio.window_seconds,
                             hop_seconds=m.audio.hop_seconds)
        v = m.vision
        assert v is not None
        return InputSpec("vision", width=v.width, height=v.height, color=v.color)

    async def _refused(self, version: str, reason: str, message: str) -> None:
        log.error("update.refused", model=self.family, version=version, reason=reason,
                  error=message[:500])
        await self._report(version, "refused", f"{reason}: {message}")

    # -- download ----------------------------------------------------------------------------
    async def _download(self, body: ReleaseBody, raw: bytes, sha: str,
                        stop: asyncio.Event) -> Path:
        return await install.download(
            self.store, self.fetcher, self.active, body, raw, sha,
            attempts=self.settings.download_attempts, backoff=self._file_backoff, stop=stop)

    # -- shadow ------------------------------------------------------------------------------
    async def _shadow(self, candidate: Path, body: ReleaseBody) -> str | None:
        """None when the candidate may run; else why not."""
        inputs: list[CanaryInput] = []
        if self.ring is not None:
            inputs = await self.ring.inputs(self.gate.modality)
        if not inputs:
            a = self.gate.manifest.audio
            window = a.window_samples if a is not None else 0
            inputs = await asyncio.to_thread(sample_inputs, self.gate.modality,
                                             window_samples=window)
        report = await asyncio.to_thread(
            shadow_evaluate, self.active.manifest, candidate, body, inputs,
            thresholds=self.thresholds, max_flip=self.settings.shadow_max_flip)
        log.info("update.shadow_evaluated", model=self.family, version=body.version,
                 ok=report.ok, inputs=report.inputs, compared=report.compared,
                 flips=report.flips, reason=report.reason or None)
        return None if report.ok else report.reason

    # -- swap, trial, rollback ---------------------------------------------------------------
    async def _swap(self, body: ReleaseBody, sha: str) -> None:
        pointer, manifest = await asyncio.to_thread(
            install.commit, self.store, self.active, body, sha, self.clock())
        ref = pointer.active
        baseline = (sum(self._baseline) / len(self._baseline)) if self._baseline else None
        assert pointer.trial is not None
        self._trial = _TrialState(body.tag, pointer.trial.started_at, baseline)
        try:
            await self.gate.swap(manifest)
        except EdgekeeperError as err:
            self._trial = None
            await self._rollback(pointer, f"swap_failed: {err.message}"[:300])
            return
        self.active = Active(ref, manifest, body, pointer)
        log.info("update.active", model=self.family, version=body.version, slot=ref.label,
                 trial_inferences=self.settings.trial_inferences,
                 trial_seconds=self.settings.trial_seconds)
        if self.on_swapped is not None:
            self.on_swapped(self.gate.manifest.tag)
        await self._report(body.version, "active", "")

    def _trial_due(self) -> bool:
        t = self._trial
        return t is not None and (
            t.failed is not None or t.inferences >= self.settings.trial_inferences
            or self.clock() - t.started_at >= self.settings.trial_seconds)

    async def finish_trial(self) -> None:
        trial, pointer = self._trial, self.active.pointer
        if trial is None or pointer is None or pointer.trial is None:
            self._trial = None
            return
        if trial.failed is not None:
            self._trial = None
            await self._rollback(pointer, trial.failed)
            return
        if not self._trial_due():
            return  # woken early (not due yet)
        self._trial = None
        pointer = await asyncio.to_thread(install.passed, self.store, pointer)
        self.active = replace(self.active, pointer=pointer)
        log.info("update.trial_passed", model=self.family, version=self.active.ref.version,
                 inferences=trial.inferences)
        await self._report(self.active.ref.version, "trial_passed",
                           f"{trial.inferences} inferences")

    async def _rollback(self, pointer: Pointer, reason: str) -> None:
        failed = pointer.active.version
        back = self.store.rolled_back(pointer)
        try:
            body = await asyncio.to_thread(self.store.verify_ref, back.active)
        except (ReleaseRefused, OSError) as err:
            log.error("update.slot_damaged", model=self.family, slot=back.active.label,
                      error=str(err))
            back = replace(back, active=self.store.builtin)
            body = None
        back = await asyncio.to_thread(self.store.write_pointer, back)
        manifest = self.store.manifest_of(back.active, body)
        if self.gate.manifest.path != manifest:
            await self.gate.swap(manifest)
        self.active = Active(back.active, manifest, body, back)
        log.error("update.rolled_back", model=self.family, version=failed,
                  to=back.active.version, reason=reason)
        if self.on_swapped is not None:
            self.on_swapped(self.gate.manifest.tag)
        await self._report(failed, "rolled_back", reason)

    # -- reports -----------------------------------------------------------------------------
    async def _report(self, version: str, outcome: str, reason: str) -> None:
        self._reports.append((version, outcome, reason, self.clock()))
        await self._flush_reports()

    async def _flush_reports(self) -> None:
        """Send what is queued, in order. A transient failure keeps the rest for the next
        round; a report the cloud refuses (4xx) is dropped, logged, so it cannot block the
        others forever."""
        while self._reports:
            version, outcome, reason, at = self._reports[0]
            try:
                await self.fetcher.report(self.family, version, outcome, reason, at,
                                          running=self.active.ref.version)
            except RetryableError as err:
                log.warning("update.report_failed", model=self.family, outcome=outcome,
                            error=err.message[:200], queued=len(self._reports))
                return
            except EdgekeeperError as err:
                log.error("update.report_refused", model=self.family, outcome=outcome,
                          version=version, error=err.message[:200])
            self._reports.popleft()


def _claimed_version(raw: bytes, hinted: str) -> str:
    """The version a release that failed verification *claims* (unverified: only to name it in
    the report), else the one the long-poll hinted at, else 0.0.0."""
    with contextlib.suppress(ValueError, KeyError, TypeError, binascii.Error,
                             UnicodeDecodeError, ReleaseRefused):
        payload = json.loads(base64.b64decode(json.loads(raw)["payload"]))
        parse_version(payload["version"])
        return str(payload["version"])
    with contextlib.suppress(ReleaseRefused):
        parse_version(hinted)
        return hinted
    return "0.0.0"

