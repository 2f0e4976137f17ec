"""The one backoff of every long-lived loop: exponential, full jitter, capped, reset on success,
a server's Retry-After respected.

The n-th wait in a row is uniform in [0, min(cap, base * 2**n)] (AWS architecture blog,
"Exponential Backoff And Jitter"). Full rather than equal jitter: after an outage every device
(or worker) retries at once, and the uniform spread is what keeps them from arriving in waves.
A Retry-After is a floor, bounded by RETRY_AFTER_MAX_S so a broken header cannot park a loop for
days.

Why our own object and not ``stamina`` (which the bounded retries of a single call use, e.g. the
result actions in device/results.py): the uploader, the results poller, the worker's queue and
provider loops run for months and keep their failure count *across* rounds (a round that
succeeds resets it, a halted device looks again at the cap), they sleep with the runtime's
stop-aware ``sleep`` so a drain is never held up by a wait, and they take the server's
Retry-After; stamina's retry loop owns the attempts and the sleeping, which fits one call, not
a loop that must also stop, report its wait and carry on.

``Circuit`` is the worker's view of a provider that is down as a whole: open (no leasing), a
probe when the wait is over, the wait growing with the same backoff while probes fail.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable

# The longest Retry-After we obey.
RETRY_AFTER_MAX_S = 3600.0


class Backoff:
    """Exponential backoff with full jitter; ``failures`` counts the waits since the last
    success."""

    def __init__(self, base: float = 1.0, cap: float = 300.0,
                 rng: random.Random | None = None) -> None:
        if not 0 <= base <= cap:  # base 0: never wait (tests, "retry at once")
            raise ValueError("0 <= base <= cap is required")
        self.base = base
        self.cap = cap
        self.rng = rng or random.Random()
        self.failures = 0

    def ceiling(self) -> float:
        # min() before the power would overflow for a long outage: cap the exponent too.
        return min(self.cap, self.base * 2.0 ** min(self.failures, 64))

    def next_delay(self, retry_after: float | None = None) -> float:
        """The wait before the next try, counting one more failure."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.failures += 1
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_MAX_S))
        return delay

    def delay_for(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before retry number ``attempt`` (1-based) of one item whose attempts are
        counted elsewhere (a queue's delivery count), without touching ``failures``."""
        ceiling = min(self.cap, self.base * 2.0 ** min(max(0, attempt - 1), 64))
        delay = self.rng.uniform(0.0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_MAX_S))
        return delay

    def reset(self) -> None:
        self.failures = 0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), clamped to
    [0, RETRY_AFTER_MAX_S]; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    seconds: float
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


class Circuit:
    """Closed (calls flow) or open (wait, then probe). One per worker process."""

    def __init__(self, initial_s: float = 2.0, max_s: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.backoff = Backoff(initial_s, max_s, rng)
        self._clock = clock
        self.opened_at: float | None = None
        self._until = 0.0

    @property
    def failures(self) -> int:
        """Failed episodes in a row (the first trip, then every failed probe)."""
        return self.backoff.failures

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
                self._until = max(self._until, now + min(retry_after, RETRY_AFTER_MAX_S))
            return self.remaining()
        self.opened_at = now
        self.backoff.reset()
        self._until = now + self.backoff.next_delay(retry_after)
        return self.remaining()

    def probe_failed(self, retry_after: float | None = None) -> float:
        now = self._clock()
        if not self.is_open:
            self.opened_at = now
        self._until = now + self.backoff.next_delay(retry_after)
        return self.remaining()

    def close(self) -> float:
        """The provider answered: returns how long the circuit was open."""
        down = 0.0 if self.opened_at is None else self._clock() - self.opened_at
        self.opened_at = None
        self.backoff.reset()
        self._until = 0.0
        return down
