"""Uncertainty over problems: an interval for one run's quality, a paired test between two runs.

A benchmark's problems are the sample: a run that solves 10 of 40 problems tells a pass rate to
within about +-13 points, and two runs are compared on the problems both ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval (95 % by default) for a proportion ``successes / n``.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n successes.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1; got successes={successes}, n={n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    items: Sequence, statistic: Callable[[list], float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``items`` (problems) drawn with replacement."""
    if not items:
        raise ValueError("bootstrap_interval needs at least one item")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(items), size=(resamples, len(items)))
    values = np.array([statistic([items[i] for i in row]) for row in draws])
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | both sides equally likely).

    On pass/fail verdicts with one sample per problem, ``wins`` / ``losses`` are the discordant
    problems and this is the exact McNemar test. Ties do not count.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    low = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(a: dict[str, float], b: dict[str, float], higher_is_better: bool = True) -> dict:
    """Compare two runs' per-problem scores on the problems both ran.

    Returns ``shared`` (problems in both), ``a_better`` / ``b_better`` (problems where one scored
    strictly better: solved what the other did not, for pass/fail) and the sign test's ``p``.
    """
    shared = sorted(set(a) & set(b))
    sign = 1 if higher_is_better else -1
    a_better = sum(sign * (a[t] - b[t]) > 0 for t in shared)
    b_better = sum(sign * (b[t] - a[t]) > 0 for t in shared)
    return {"shared": len(shared), "a_better": a_better, "b_better": b_better, "p": sign_test(a_better, b_better)}
