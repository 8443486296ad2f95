"""Tier times, reported (docs/RELIABILITY.md 37): what the promise's time limits can honestly mean.

The unit tier's 60 s and the integration tier's 10 min are budgets for a developer's machine, not
behaviour: asserting them would fail on a loaded CI box and break promise 38 (no wall-clock asserts). So
every run ends with each tier's summed time (setup + call + teardown of every test, by marker: `slow`,
`browser`, `gpu`, else `unit`) next to its budget, and the Makefile's `--durations=15` names the slowest
tests; a tier over budget is flagged in the report, never failed."""

from __future__ import annotations

BUDGET_S = {"unit": 60.0, "slow": 600.0}
TIER_MARKERS = ("browser", "gpu", "slow")  # the first a test carries decides its tier


def tier_of(keywords) -> str:
    return next((m for m in TIER_MARKERS if m in keywords), "unit")


class TierClock:
    """Sums the phases' durations per tier and counts each test once, at its setup phase (a skipped test
    has no call phase, and is counted too)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.tests: dict[str, int] = {}

    def add(self, report) -> None:
        tier = tier_of(report.keywords)
        self.seconds[tier] = self.seconds.get(tier, 0.0) + float(report.duration)
        if report.when == "setup":
            self.tests[tier] = self.tests.get(tier, 0) + 1

    def lines(self) -> list[str]:
        out = []
        for tier in sorted(self.seconds):
            s, budget = self.seconds[tier], BUDGET_S.get(tier)
            note = "" if budget is None else f" (budget {budget:.0f} s{', OVER' if s > budget else ''})"
            out.append(f"{tier}: {self.tests.get(tier, 0)} tests, {s:.1f} s{note}")
        return out
