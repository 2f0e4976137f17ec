"""Trigger policy edge cases: k-of-n, hysteresis, cooldown, hourly cap, unknown labels."""

from __future__ import annotations

from edgekeeper.config import LabelRule, TriggerSection
from edgekeeper.device.trigger import TriggerPolicy


def policy(k: int = 3, n: int = 5, cap: int = 60, **rule: float) -> TriggerPolicy:
    r = LabelRule(**{"threshold": 0.6, "release": 0.4, "cooldown_seconds": 10.0, **rule})
    return TriggerPolicy(TriggerSection(k=k, n=n, max_events_per_hour=cap, labels={"person": r}))


def feed(p: TriggerPolicy, scores: list[float], t0: float = 0.0, dt: float = 1.0) -> list:
    out = []
    for i, s in enumerate(scores):
        out += p.update(t0 + i * dt, {"person": s, "no_person": 1 - s})
    return out


def test_fires_only_when_k_of_n_windows_reach_threshold() -> None:
    p = policy()
    assert feed(p, [0.9, 0.1, 0.9, 0.1]) == []  # 2 of 4: not yet
    decisions = feed(p, [0.9], t0=4)  # 3 of last 5
    assert [d.action for d in decisions] == ["fire"]
    assert decisions[0].hits == 3 and decisions[0].label == "person"
    assert "3 of last 5" in decisions[0].reason


def test_threshold_is_inclusive_and_single_spike_never_fires() -> None:
    p = policy(k=1, n=1)
    assert [d.action for d in feed(p, [0.6])] == ["fire"]
    p = policy()
    assert feed(p, [0.99, 0.0, 0.0, 0.0, 0.0, 0.99, 0.0]) == []


def test_hysteresis_one_activation_one_event_until_release() -> None:
    p = policy(cooldown_seconds=0.0)
    d = feed(p, [0.9, 0.9, 0.9])
    assert [x.action for x in d] == ["fire"]
    # Hovering between release (0.4) and threshold (0.6) keeps it active: no new event.
    assert feed(p, [0.5, 0.45, 0.55, 0.5, 0.5, 0.9, 0.9, 0.9], t0=3) == []
    d = feed(p, [0.1, 0.1, 0.1], t0=11)
    assert [x.action for x in d] == ["release"]
    d = feed(p, [0.9, 0.9, 0.9], t0=14)
    assert [x.action for x in d] == ["fire"]


def test_cooldown_holds_back_and_says_why() -> None:
    p = policy(k=1, n=1, cooldown_seconds=10.0)
    assert [x.action for x in feed(p, [0.9])] == ["fire"]
    assert [x.action for x in feed(p, [0.1], t0=1)] == ["release"]
    held = feed(p, [0.9], t0=5)
    assert [x.action for x in held] == ["hold"]
    assert "cooldown" in held[0].reason
    feed(p, [0.1], t0=6)
    assert [x.action for x in feed(p, [0.9], t0=10)] == ["fire"]  # exactly at the boundary


def test_hourly_cap_counts_across_a_sliding_hour() -> None:
    p = policy(k=1, n=1, cap=2, cooldown_seconds=0.0)
    actions = []
    for t in (0, 10, 20):
        actions += [d.action for d in feed(p, [0.9, 0.1], t0=t)]
    assert actions == ["fire", "release", "fire", "release", "hold", "release"]
    assert p.stats.held_rate_cap == 1
    # An hour after the first event, one slot is free again.
    assert [d.action for d in feed(p, [0.9], t0=3600)] == ["fire"]


def test_labels_without_a_rule_never_trigger() -> None:
    p = policy(k=1, n=1)
    assert p.update(0.0, {"no_person": 1.0, "dog": 1.0}) == []


def test_explain_carries_numbers() -> None:
    p = policy(k=1, n=1)
    (d,) = feed(p, [0.93])
    e = d.explain()
    assert e["action"] == "fire" and e["score"] == 0.93 and e["threshold"] == 0.6 and e["n"] == 1
