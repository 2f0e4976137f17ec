"""The device link's backoff: exponential with full jitter, a server's Retry-After respected, and
a sleep that a stop (or wake-up) event cuts short.

The uploader (device/uplink.py) and the results poller (device/results.py) both use it; it lives
in its own module so neither has to import the other.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

# The longest Retry-After we obey: a broken or hostile header must not park the device for days.
RETRY_AFTER_MAX_S = 3600.0


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


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
    Jitter"): the n-th wait is uniform in [0, min(cap, base * 2**n)].

    Full rather than equal jitter: after a cloud outage every device retries at once, and the
    uniform spread is what keeps them from arriving in waves. A server's Retry-After is a floor:
    the wait is never shorter than what it asked for.
    """

    def __init__(self, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None):
        if not 0 < base <= cap:
            raise ValueError("0 < base <= cap is required")
        self.base = base
        self.cap = cap
        self.rng = rng or random.Random()
        self.failures = 0

    def ceiling(self) -> float:
        # min() before the power would overflow for a long outage: cap the exponent too.
        return min(self.cap, self.base * 2.0 ** min(self.failures, 64))

    def next_delay(self, retry_after: float | None = None) -> float:
        delay = self.rng.uniform(0.0, self.ceiling())
        self.failures += 1
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_MAX_S))
        return delay

    def reset(self) -> None:
        self.failures = 0


async def sleep(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Sleep up to ``seconds``; return early when ``stop`` (or ``wake``) is set."""
    if seconds <= 0 or stop.is_set():
        return
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
