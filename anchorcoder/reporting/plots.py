"""The report's figures: quality against measured KV reduction, and peak KV bytes against context length.

Every line is labelled at its end, so a figure reads without hunting through a legend.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from anchorcoder.reporting.compare import BUDGET_KEYS, Run, tables  # noqa: E402


def _scored(runs: list[Run]) -> dict[str, list[Run]]:
    """Finished runs with a quality, by table; one figure per table."""
    scored = [r for r in runs if r.finished and r.quality is not None]
    return {title: group for title, group in tables(scored).items()}


def _series(runs: list[Run]) -> dict[str, list[Run]]:
    """One line per method, options other than the budget, and adapter: its budgets become the line."""
    series = defaultdict(list)
    for run in runs:
        options = " ".join(o for o in run.options.split(" ") if o and o.split("=")[0] not in BUDGET_KEYS)
        adapter = f" trained ({Path(run.adapter).name})" if run.adapter else ""
        series[" ".join(x for x in (run.method, options) if x) + adapter].append(run)
    return series


def _save(fig, path: Path, right: float = 1.0) -> Path:
    fig.tight_layout(rect=(0, 0, right, 1))  # right < 1 leaves room for a figure legend
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _file_name(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", title).strip("_")[:80]


def plot_tradeoff(runs: list[Run], out: Path) -> list[Path]:
    """Per benchmark: quality vs measured KV reduction, at the end of generation and at the peak."""
    paths = []
    for title, group in _scored(runs).items():
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), sharey=True)
        ppl = group[0].quality_key == "ppl"
        for ax, key, when in zip(
            axes, ("kv/reduction_final", "kv/reduction_peak"), ("at the end of generation", "at the peak"), strict=True
        ):
            stacked: dict[tuple, int] = {}
            values = [math.log(r.quality) if ppl else r.quality for r in group]
            low, span = min(values), (max(values) - min(values)) or 1.0
            scale = lambda q: ((math.log(q) if ppl else q) - low) / span  # noqa: E731, B023
            for index, (name, members) in enumerate(sorted(_series(group).items())):
                members = sorted(members, key=lambda r: r.metrics.get(key, 0.0))
                x = [r.metrics.get(key, 0.0) for r in members]
                y = [r.quality for r in members]
                errors = [[r.quality - r.interval[0] for r in members], [r.interval[1] - r.quality for r in members]]
                color = f"C{index % 10}"
                ax.errorbar(
                    x, y, yerr=errors, color=color, marker="osD^v<>ph*"[index % 10], capsize=2, lw=1.2, label=name
                )
                spot = (round(x[-1] * 8), round(scale(y[-1]) * 12))  # labels that would land together are stacked
                stacked[spot] = stacked.get(spot, -1) + 1
                ax.annotate(
                    name,
                    (x[-1], y[-1]),
                    xytext=(4, 4 + 9 * stacked[spot]),
                    textcoords="offset points",
                    color=color,
                    fontsize=8,
                )
            ax.set_xlabel(f"measured KV reduction {when}")
            ax.set_xlim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        if ppl:
            axes[0].set_yscale("log")
        axes[0].set_ylabel("perplexity (lower is better)" if ppl else "pass@1")
        fig.suptitle(f"{title}: quality vs measured KV reduction; bars = 95 % CI over problems", fontsize=10)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7, frameon=False)
        paths.append(_save(fig, out / f"tradeoff_{_file_name(title)}.png", right=0.8))
    return paths


def plot_context_peaks(runs: list[Run], out: Path) -> list[Path]:
    """Per benchmark: each sample's peak KV bytes against its context (prompt + generated tokens)."""
    paths = []
    for title, group in _scored(runs).items():
        group = [r for r in group if r.contexts]
        if not group:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for index, run in enumerate(group):
            points = sorted(run.contexts)
            x = [c for c, _ in points]
            y = [b / 2**20 for _, b in points]
            color = f"C{index % 10}"
            ax.plot(x, y, ".", color=color, ms=3, alpha=0.6)
            ax.annotate(run.label, (x[-1], y[-1]), xytext=(4, 0), textcoords="offset points", color=color, fontsize=7)
        ax.set_xlabel("context: prompt + generated tokens")
        ax.set_ylabel("peak KV cache held (MiB)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}: peak KV bytes per sample", fontsize=10)
        paths.append(_save(fig, out / f"peak_kv_{_file_name(title)}.png"))
    return paths
