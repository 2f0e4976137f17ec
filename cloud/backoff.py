"""Backing off from a failing provider: jittered delays, and the circuit a worker keeps.

When the provider fails as a whole (5xx, 529, timeouts, a 429 the SDK's retries could not wait
out), calling it for every leased event would only burn attempts and quota. The worker trips its
``Circuit``: it stops leasing, waits, and sends one small probe; a probe that fails doubles the
wait (up to a cap), one that succeeds closes the circuit and leasing resumes. Waits are
jittered so that many workers that saw the same outage do not probe, or come back, in step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


def jittered(delay: float, rng: Callable[[], float] = random.random) -> float:
    """'Equal jitter': somewhere in [delay/2, delay], never less than half the intended wait."""
    return delay / 2.0 + rng() * delay / 2.0


def exponential(attempt: int, base: float, cap: float,
                rng: Callable[[], float] = random.random) -> float:
    """The delay before retry number ``attempt`` (1-based): base * 2^(attempt-1), capped,
    jittered."""
    if base <= 0:
        return 0.0
    return jittered(min(cap, base * 2.0 ** max(0, attempt - 1)), rng)


class Circuit:
    """Closed (calls flow) or open (wait, then probe). One per worker process."""

    def __init__(self, initial_s: float = 2.0, max_s: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._clock = clock
        self._rng = rng
        self.failures = 0  # failed episodes in a row (first trip + failed probes)
        self.opened_at: float | None = None
        self._until = 0.0

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def remaining(self) -> float:
        """Seconds until the next probe is due (0 when closed or due now)."""
        return max(0.0, self._until - self._clock()) if self.is_open else 0.0

    def trip(self, retry_after: float | None = None) -> float:
        """A call failed because the provider is down. Calls already in flight that fail in
        the same outage do not lengthen the wait; only failed probes do. Returns the wait."""
        now = self._clock()
        if self.is_open:
            if retry_after:
                self._until = max(self._until, now + min(retry_after, 3600.0))
            return self.remaining()
        self.opened_at = now
        self.failures = 1
        self._schedule(now, retry_after)
        return self.remaining()

    def probe_failed(self, retry_after: float | None = None) -> float:
        now = self._clock()
        if not self.is_open:
            self.opened_at = now
        self.failures += 1
        self._schedule(now, retry_after)
        return self.remaining()

    def close(self) -> float:
        """The provider answered: returns how long the circuit was open."""
        down = 0.0 if self.opened_at is None else self._clock() - self.opened_at
        self.opened_at = None
        self.failures = 0
        self._until = 0.0
        return down

    def _schedule(self, now: float, retry_after: float | None) -> None:
        wait = jittered(min(self.max_s, self.initial_s * 2.0 ** (self.failures - 1)), self._rng)
        if retry_after:
            # The provider's own hint wins when longer (capped: a bogus hour-long hint must
            # not park the worker for longer than that).
            wait = max(wait, min(retry_after, 3600.0))
        self._until = now + wait
