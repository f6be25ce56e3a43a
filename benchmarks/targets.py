"""
The targets the issues set for filecache's figures (issues 4, 10 and 13), and
the verdict on one figure: pure logic, shared by the native and the HTTP table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from benchmarks.servers import SERVER_LABELS

# filecache's figure and the other servers' (by server name) -> met, or None
# when a figure it needs is missing.
Judge = Callable[[float, Mapping[str, float]], "bool | None"]


@dataclass(frozen=True)
class Goal:
    """One target one issue set for one figure."""

    issue: str  # as the table names it: "4", "13", "4 (workload 1's)"
    text: str  # ">= 0.6 x nginx tuned"
    judge: Judge


def at_least(issue: str, minimum: float, other: str) -> Goal:
    """filecache's figure at least C{minimum} times server C{other}'s."""

    def judge(fc: float, others: Mapping[str, float]) -> bool | None:
        reference = others.get(other)
        return fc / reference >= minimum if reference else None

    return Goal(issue, f">= {minimum:g} x {SERVER_LABELS[other]}", judge)


def under(issue: str, limit: float, unit: str) -> Goal:
    """filecache's figure under C{limit}, whatever the others did."""
    return Goal(issue, f"< {limit:g} {unit}", lambda fc, others: fc < limit)


@dataclass(frozen=True)
class Verdict:
    """A row's target and met cells."""

    target: str
    met: str


MET_TEXT = {True: "yes", False: "**no**", None: "?"}


def _all_met(results: Sequence[bool | None]) -> bool | None:
    """False if any goal is missed, else None if any could not be judged, else True."""
    if False in results:
        return False
    return None if None in results else True


def _issues(issues: Sequence[str]) -> str:
    return ("issue " if len(issues) == 1 else "issues ") + ", ".join(issues)


def judge(
    goals: Sequence[Goal], fc: float | None, others: Mapping[str, float], errors: bool
) -> Verdict:
    """
    The verdict on filecache's figure C{fc} (None: no figure) against
    C{goals}, issue by issue: a reader must see which issue's target a
    figure misses, so each issue is judged on its own.  Issues whose goals
    read the same (issue 4's and issue 13's "< 5 ms") share one entry.  A
    figure measured with errors meets nothing.
    """
    if not goals:
        return Verdict("-", "-")
    by_issue: dict[str, list[Goal]] = {}
    for goal in goals:
        by_issue.setdefault(goal.issue, []).append(goal)
    # The goals' texts -> the issues that set exactly those, in order.
    same: dict[tuple[str, ...], list[str]] = {}
    for issue, its_goals in by_issue.items():
        same.setdefault(tuple(g.text for g in its_goals), []).append(issue)
    targets, verdicts = [], []
    for texts, issues in same.items():
        its_goals = by_issue[issues[0]]
        targets.append(f"{_issues(issues)}: " + ", ".join(texts))
        met = None if fc is None else _all_met([g.judge(fc, others) for g in its_goals])
        verdicts.append((issues, met))
    if errors:
        met_text = "**no** (errors)"
    elif len(verdicts) == 1:
        met_text = MET_TEXT[verdicts[0][1]]
    else:
        met_text = "; ".join(f"{_issues(issues)}: {MET_TEXT[met]}" for issues, met in verdicts)
    return Verdict("; ".join(targets), met_text)
