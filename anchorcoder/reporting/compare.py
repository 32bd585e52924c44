"""Finished eval runs -> one comparison: a table per benchmark (quality with its interval, measured KV
reduction final and peak, speed, a paired test against dense) and the trade-off plots.

Reads only run folders (``config.yaml``, ``metrics.json``, ``results.jsonl``, ``generations.jsonl``),
so any mix of single runs and multiruns, old or new, can be compared. Used by
``python -m anchorcoder.report`` and at the end of every ``eval.py -m`` sweep.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from anchorcoder.reporting.stats import bootstrap_interval, paired_comparison, wilson_interval

BUDGET_KEYS = ("compression_ratio", "max_tokens")  # always shown: they set an eviction method's budget
NOT_OPTIONS = ("name",)
# Settings that change no sample: runs that differ only in these share a table (and a dense reference)
NOT_SETTINGS = ("generation.batch_size", "generation.continuous_batching", "benchmark.timeout_s")


def setting_of(cfg: dict) -> dict:
    """What makes two runs comparable problem by problem: the model, the benchmark's config, the
    generation settings and seed, and the verdict rule; the method is what a table compares."""
    flat = {}
    for group in ("model", "benchmark", "generation"):
        for key, value in (cfg.get(group) or {}).items():
            if f"{group}.{key}" not in NOT_SETTINGS and key != "adapter":
                flat[f"{group}.{key}"] = value
    flat["seed"] = cfg.get("seed")
    flat["execution.strict_equality"] = (cfg.get("execution") or {}).get("strict_equality", False)
    return flat


@dataclass
class Run:
    """One run folder as the report sees it."""

    folder: str
    benchmark: str
    model: str
    method: str
    method_options: dict
    adapter: str | None
    finished: bool
    setting: dict = field(default_factory=dict)  # see setting_of
    table: str = ""  # the table's heading: benchmark, model and the settings that tell it from others
    metrics: dict = field(default_factory=dict)
    quality_key: str | None = None  # "pass@1" | "ppl"
    quality: float | None = None
    interval: tuple[float, float] | None = None
    per_problem: dict[str, float] = field(default_factory=dict)  # the score paired tests compare
    options: str = ""  # filled by label_options: the options that tell this run from its siblings
    vs_dense: dict | None = None
    contexts: list[tuple[int, int]] = field(default_factory=list)  # (context tokens, peak KV bytes) per sample

    @property
    def label(self) -> str:
        return " ".join(x for x in (self.method, self.options, "trained" if self.adapter else "") if x)

    @property
    def higher_is_better(self) -> bool:
        return self.quality_key != "ppl"

    def row(self) -> dict:
        keep = ("folder", "table", "benchmark", "model", "method", "options", "adapter", "finished", "quality_key")
        out = {k: v for k, v in asdict(self).items() if k in keep}
        out.update(quality=self.quality, interval=list(self.interval) if self.interval else None)
        out.update(vs_dense=self.vs_dense, metrics=self.metrics)
        return out


def flat_row(run: Run) -> dict:
    """One run as a flat row (the W&B comparison table's columns)."""
    m, c = run.metrics, run.vs_dense or {}
    low, high = run.interval or (None, None)
    return {
        "table": run.table,
        "method": run.method,
        "options": run.options,
        "adapter": run.adapter,
        "finished": run.finished,
        "quality_key": run.quality_key,
        "quality": run.quality,
        "interval_low": low,
        "interval_high": high,
        "kv_reduction_final": m.get("kv/reduction_final"),
        "kv_reduction_peak": m.get("kv/reduction_peak"),
        "decode_tokens_per_s": m.get("speed/decode_tokens_per_s"),
        "wall_s": m.get("run/wall_s"),
        "vs_dense_better": c.get("a_better"),
        "vs_dense_worse": c.get("b_better"),
        "vs_dense_p": c.get("p"),
        "folder": run.folder,
    }


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (holding an eval ``config.yaml``) at or below ``paths``, in a stable order."""
    found = set()
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no such run folder: {path}")
        for config in [path / "config.yaml", *path.rglob("config.yaml")]:
            inside = config.relative_to(path).parts
            if config.exists() and ".hydra" not in inside and "wandb" not in inside:
                found.add(config.parent)
    return sorted(found)


def read_run(folder: Path) -> Run | None:
    """The run in ``folder``; None for a folder that is not an eval run (e.g. a train.py run)."""
    cfg = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=False)
    if not isinstance(cfg.get("benchmark"), dict) or not isinstance(cfg.get("method"), dict):
        return None
    method = cfg["method"]
    run = Run(
        folder=str(folder),
        benchmark=cfg["benchmark"]["name"],
        model=cfg["model"]["name"],
        method=method["name"],
        method_options={k: v for k, v in method.items() if k not in NOT_OPTIONS},
        adapter=cfg["model"].get("adapter"),
        finished=(folder / "metrics.json").exists() and (folder / "results.jsonl").exists(),
        setting=setting_of(cfg),
    )
    if not run.finished:
        return run
    run.metrics = json.loads((folder / "metrics.json").read_text())
    results = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line]
    _score(run, results)
    generations = folder / "generations.jsonl"
    if generations.exists():
        peaks = {(r["task_id"], r.get("sample_index", 0)): r["kv"]["bytes_peak"] for r in results}
        for line in generations.read_text().splitlines():
            g = json.loads(line)
            key = (g["task_id"], g.get("sample_index", 0))
            if key in peaks:
                run.contexts.append((len(g["prompt_token_ids"]) + len(g["token_ids"]), peaks[key]))
    return run


def _score(run: Run, results: list[dict]) -> None:
    """Quality, its 95 % interval over problems, and the per-problem scores, from ``results.jsonl``."""
    if not results:
        return
    if results and "nll" in results[0]:  # teacher-forced perplexity: pooled over tokens, as the metric
        by_task = {r["task_id"]: (r["nll"], r["target_tokens"]) for r in results}
        pooled = lambda items: math.exp(sum(n for n, _ in items) / sum(t for _, t in items))  # noqa: E731
        items = list(by_task.values())
        run.quality_key, run.quality = "ppl", pooled(items)
        run.interval = bootstrap_interval(items, pooled)
        run.per_problem = {t: n / k for t, (n, k) in by_task.items()}  # nll per token: lower is better
        return
    samples = defaultdict(list)
    for r in results:
        samples[r["task_id"]].append(bool(r["passed"]))
    run.quality_key = "pass@1"
    run.per_problem = {t: sum(s) / len(s) for t, s in samples.items()}  # each problem's pass@1 estimate
    scores = list(run.per_problem.values())
    run.quality = sum(scores) / len(scores)
    if all(len(s) == 1 for s in samples.values()):  # one verdict per problem: a binomial proportion
        run.interval = wilson_interval(sum(s[0] for s in samples.values()), len(samples))
    else:
        run.interval = bootstrap_interval(scores, lambda xs: sum(xs) / len(xs))


def label_options(runs: list[Run]) -> None:
    """Name each run by the method options that differ among the runs of its method (budgets always)."""
    by_method = defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)
    for group in by_method.values():
        keys = sorted({k for r in group for k in r.method_options})
        varying = [k for k in keys if len({json.dumps(r.method_options.get(k)) for r in group}) > 1]
        for run in group:
            shown = [k for k in keys if (k in BUDGET_KEYS and run.method_options.get(k) is not None) or k in varying]
            run.options = " ".join(f"{k}={run.method_options.get(k)}" for k in shown)


def name_tables(runs: list[Run]) -> None:
    """One table per setting: headed by benchmark and model, plus the settings that differ between
    tables of the same benchmark (e.g. ``benchmark.limit=8`` against ``=20``)."""
    by_benchmark = defaultdict(list)
    for run in runs:
        by_benchmark[(run.benchmark, run.model)].append(run)
    for (benchmark, model), group in by_benchmark.items():
        keys = sorted({k for r in group for k in r.setting})
        varying = [k for k in keys if len({json.dumps(r.setting.get(k), sort_keys=True) for r in group}) > 1]
        for run in group:
            extra = ", ".join(f"{k}={run.setting.get(k)}" for k in varying)
            run.table = f"{benchmark} ({model}{', ' + extra if extra else ''})"


def compare_with_dense(runs: list[Run]) -> None:
    """Pair every finished run with the (first) dense run of its table: same model, benchmark and settings."""
    dense = {}
    for run in runs:
        if run.finished and run.method == "dense" and not run.adapter:
            dense.setdefault(run.table, run)
    for run in runs:
        reference = dense.get(run.table)
        if run.finished and reference is not None and reference is not run:
            run.vs_dense = paired_comparison(run.per_problem, reference.per_problem, run.higher_is_better)


def collect(paths: list[Path]) -> list[Run]:
    runs = [r for r in (read_run(f) for f in find_runs(paths)) if r is not None]
    label_options(runs)
    name_tables(runs)
    compare_with_dense(runs)
    order = {"dense": 0}
    runs.sort(key=lambda r: (r.table, order.get(r.method, 1), r.method, bool(r.adapter), r.options))
    return runs


# ---------------------------------------------------------------------------------------- the table
def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _quality_cell(run: Run) -> str:
    if run.quality_key == "ppl":
        lo, hi = run.interval
        return f"ppl {run.quality:.2f} [{lo:.2f}, {hi:.2f}]"
    lo, hi = run.interval
    return f"{run.quality:.3f} [{lo:.3f}, {hi:.3f}]"


def _paired_cell(run: Run) -> str:
    if run.vs_dense is None:
        return "-"
    c = run.vs_dense
    partial = f", {c['shared']} shared problems" if c["shared"] < len(run.per_problem) else ""
    return f"+{c['a_better']} / -{c['b_better']} (p={c['p']:.2g}{partial})"


def tables(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by table (see name_tables), in the runs' order."""
    grouped = defaultdict(list)
    for run in runs:
        grouped[run.table].append(run)
    return grouped


def markdown(runs: list[Run]) -> str:
    lines = []
    for title, group in tables(runs).items():
        finished = [r for r in group if r.finished]
        n = {len(r.per_problem) for r in finished}
        size = f": {'/'.join(str(x) for x in sorted(n))} problems" if n else ""
        key = next((r.quality_key for r in finished), None)
        head = "ppl (lower is better) [95 % CI]" if key == "ppl" else "pass@1 [95 % CI]"
        lines += [
            f"### {title}{size}",
            "",
            f"| method | options | adapter | {head} | KV red. final | KV red. peak | decode tok/s | wall s "
            "| vs dense: better / worse (sign test) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for run in group:
            adapter = Path(run.adapter).name if run.adapter else "-"
            if not run.finished or run.quality is None:
                state = "unfinished" if not run.finished else "no samples"
                lines.append(f"| {run.method} | {run.options or '-'} | {adapter} | {state}: `{run.folder}` | | | | | |")
                continue
            m = run.metrics
            lines.append(
                f"| {run.method} | {run.options or '-'} | {adapter} | {_quality_cell(run)} "
                f"| {_num(m.get('kv/reduction_final'))} | {_num(m.get('kv/reduction_peak'))} "
                f"| {_num(m.get('speed/decode_tokens_per_s'), 1)} | {_num(m.get('run/wall_s'), 0)} | {_paired_cell(run)} |"
            )
        lines.append("")
    lines.append(
        "Intervals are 95 % over problems: Wilson for one pass/fail verdict per problem, a percentile "
        "bootstrap (2,000 resamples) otherwise. *vs dense*: problems this run does better / worse on than "
        "dense (solved or not; per-token NLL for ppl) and the exact two-sided sign test (McNemar's for "
        "pass/fail); a large p means the difference is within noise."
    )
    return "\n".join(lines) + "\n"


def side_by_side(runs: list[Run]) -> str:
    """Every method (with its options and adapter) in one row, every table in one column: quality
    (KV reduction final / peak). The comparison at a glance; the per-table sections hold the rest."""
    titles = list(tables(runs))
    if len(titles) < 2:
        return ""
    rows: dict[tuple, dict[str, str]] = {}
    for run in runs:
        if not run.finished or run.quality is None:
            continue
        key = (run.method, run.options or "-", Path(run.adapter).name if run.adapter else "-")
        value = f"{run.quality:.2f}" if run.quality_key == "ppl" else f"{run.quality:.3f}"
        m = run.metrics
        cell = f"{value} ({m.get('kv/reduction_final', 0):.2f} / {m.get('kv/reduction_peak', 0):.2f})"
        rows.setdefault(key, {})[run.table] = cell
    order = {"dense": 0}
    lines = [
        "| method | options | adapter | " + " | ".join(titles) + " |",
        "|---|---|---|" + "---|" * len(titles),
    ]
    for key in sorted(rows, key=lambda k: (order.get(k[0], 1), k)):
        lines.append("| " + " | ".join(key) + " | " + " | ".join(rows[key].get(t, "") for t in titles) + " |")
    return (
        "Each cell: quality (measured KV reduction at the end / at the peak); ppl for code_ppl (lower is "
        "better), pass@1 otherwise.\n\n" + "\n".join(lines) + "\n"
    )


def write_report(paths: list[Path], out: Path, plots: bool = True) -> tuple[list[Run], list[Path]]:
    """Write ``report.md``, ``report.json`` and (with ``plots``) the PNG plots into ``out``."""
    runs = collect(paths)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if plots and any(r.finished for r in runs):
        from anchorcoder.reporting.plots import plot_context_peaks, plot_tradeoff

        images = [*plot_tradeoff(runs, out), *plot_context_peaks(runs, out)]
    wide = side_by_side(runs)
    text = "# Report\n\n" + (f"## Side by side\n\n{wide}\n## Per benchmark\n\n" if wide else "") + markdown(runs)
    if images:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps([r.row() for r in runs], indent=1, default=str) + "\n")
    return runs, images
