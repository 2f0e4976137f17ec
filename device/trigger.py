"""Trigger policy: turns a stream of gate scores into a few events, and says why.

Per label (only labels with a rule in ``[trigger.labels]`` can trigger):

- **k-of-n smoothing**: a label activates when at least k of its last n scored windows reach its
  ``threshold``; one noisy frame cannot fire, one missed frame cannot hide a person.
- **span** (audio): a label fires only once its hits spread over at least ``min_span_seconds``
  (first to last hit window end in the current run). Audio windows overlap (2 s every 0.48 s),
  so one short sound hits several windows in a row and satisfies k-of-n by itself; but a sound
  of d seconds can only hit windows ending within d + window of each other, so with 2 s windows
  and 2.5 s a chime or click of 0.5 s or less never fires alone, whatever the model scores. What
  fires is a sound that lasts (speech, a ringing alarm) or repeats (an alert beeping for
  seconds). A run ends when none of the last n windows is a hit. 0 (person) turns it off.
- **hysteresis**: once active it stays active until fewer than k of the last n reach ``release``
  (a lower bar), so a score hovering at the threshold does not fire over and over. One
  activation yields at most one event.
- **cooldown**: after an event for a label, no new event for that label for ``cooldown_seconds``.
- **hourly cap**: across labels, at most ``max_events_per_hour`` events in any sliding hour.

Windows the pre-gate skipped carry no evidence and do not enter the window. Every change of state
returns a Decision that names the rule, so logs explain each event and each one held back.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal

from edgekeeper.config import LabelRule, TriggerSection


@dataclass(frozen=True, slots=True)
class Decision:
    t: float
    label: str
    action: Literal["fire", "hold", "release"]
    reason: str  # which rule fired or held back, in words
    score: float
    hits: int
    n: int
    threshold: float

    @property
    def fired(self) -> bool:
        return self.action == "fire"

    def explain(self) -> dict[str, object]:
        return {
            "label": self.label,
            "action": self.action,
            "reason": self.reason,
            "score": round(self.score, 4),
            "hits": self.hits,
            "n": self.n,
            "threshold": self.threshold,
            "t": round(self.t, 3),
        }


@dataclass
class _LabelState:
    window: collections.deque[float]
    active: bool = False
    last_fire: float | None = None
    # The current run of hits (for min_span_seconds): first and latest hit, and whether the run
    # was already reported as held back for being too short (one "hold" per run, not per window).
    run_start: float | None = None
    run_last: float | None = None
    run_held: bool = False


@dataclass
class TriggerStats:
    fired: int = 0
    held_cooldown: int = 0
    held_rate_cap: int = 0
    held_short: int = 0
    by_label: dict[str, int] = field(default_factory=dict)


class TriggerPolicy:
    def __init__(self, cfg: TriggerSection) -> None:
        self.cfg = cfg
        self.stats = TriggerStats()
        self._states: dict[str, _LabelState] = {}
        self._fired_at: collections.deque[float] = collections.deque()

    def reconfigure(self, cfg: TriggerSection) -> None:
        """New rules for a running policy (a config reload): activations, cooldowns and the
        hourly count carry over; with a new n each label keeps its newest scores."""
        self.cfg = cfg
        for st in self._states.values():
            if st.window.maxlen != cfg.n:
                st.window = collections.deque(st.window, maxlen=cfg.n)

    def rule(self, label: str) -> LabelRule | None:
        return self.cfg.labels.get(label)

    def _state(self, label: str) -> _LabelState:
        state = self._states.get(label)
        if state is None:
            state = self._states[label] = _LabelState(collections.deque(maxlen=self.cfg.n))
        return state

    def update(self, t: float, scores: dict[str, float]) -> list[Decision]:
        """Feed one scored window; return the decisions it caused (usually none)."""
        decisions: list[Decision] = []
        k, n = self.cfg.k, self.cfg.n
        for label, score in scores.items():
            rule = self.cfg.labels.get(label)
            if rule is None:
                continue
            st = self._state(label)
            st.window.append(score)
            hits = sum(1 for s in st.window if s >= rule.threshold)
            if score >= rule.threshold:
                if st.run_start is None:
                    st.run_start = t
                st.run_last = t
            elif hits == 0:  # no hit in the last n windows: the run (one sound) is over
                st.run_start = st.run_last = None
                st.run_held = False

            def decide(action: Literal["fire", "hold", "release"], reason: str) -> None:
                decisions.append(
                    Decision(t, label, action, reason, score, hits, n, rule.threshold)  # noqa: B023
                )

            if st.active:
                holding = sum(1 for s in st.window if s >= rule.release)
                if holding < k:
                    st.active = False
                    decide("release", f"fewer than {k} of last {n} >= release {rule.release}")
                continue
            if hits < k:
                continue
            span = 0.0
            if st.run_start is not None and st.run_last is not None:
                span = st.run_last - st.run_start
            if span < rule.min_span_seconds:
                if not st.run_held:  # say it once per run; the run may still grow and fire
                    st.run_held = True
                    self.stats.held_short += 1
                    decide(
                        "hold",
                        f"{k}-of-{n} >= {rule.threshold} but hits span {span:.2f}s < "
                        f"min_span_seconds {rule.min_span_seconds} (one short sound)",
                    )
                continue
            st.active = True  # this activation is spent, whether it fires or is held back
            if st.last_fire is not None and t - st.last_fire < rule.cooldown_seconds:
                self.stats.held_cooldown += 1
                left = rule.cooldown_seconds - (t - st.last_fire)
                decide("hold", f"{k}-of-{n} >= {rule.threshold} but cooldown has {left:.1f}s left")
                continue
            while self._fired_at and t - self._fired_at[0] >= 3600.0:
                self._fired_at.popleft()
            if len(self._fired_at) >= self.cfg.max_events_per_hour:
                self.stats.held_rate_cap += 1
                decide(
                    "hold",
                    f"{k}-of-{n} >= {rule.threshold} but the cap of "
                    f"{self.cfg.max_events_per_hour} events/hour is reached",
                )
                continue
            st.last_fire = t
            self._fired_at.append(t)
            self.stats.fired += 1
            self.stats.by_label[label] = self.stats.by_label.get(label, 0) + 1
            why = f"{hits} of last {n} windows >= threshold {rule.threshold} (k={k})"
            if rule.min_span_seconds > 0:
                why += f", hits span {span:.2f}s >= {rule.min_span_seconds}s"
            decide("fire", why)
        return decisions
