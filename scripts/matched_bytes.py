"""Quality at matched KV bytes: a reference method's measured reduction sets the eviction methods' budget.

    python scripts/matched_bytes.py --reference method=span --adapter outputs/span21/train_span_lines_ce_raw
    python scripts/matched_bytes.py --benchmarks code_ppl --reference method=span method.policy=chunks
    python scripts/matched_bytes.py --rows trained l2norm streamingllm ...   # only these rows

Per benchmark (HumanEval-164 chat, batch 8, 128 new tokens, chunks of 16; code_ppl on the first 30
HumanEval + 30 MBPP solutions; code_needle 2k, 20 modules, chunks of 64), the rows: ``dense``; the
reference method ``untrained`` and, with --adapter, ``trained``; ``anchorcoder`` and ``anllm``
untrained (their cache is set by the text, not by a budget, so they stand at their own measured
reduction); then ``l2norm`` and ``streamingllm`` (``every_step``, so the budget also holds during a
chunked prefill) with the ratio that removes the reference's measured fraction of bytes (the trained
run's when there is one), the layers they skip held whole. Every run is a real eval.py run in --out,
reused when finished, so an interrupted table continues. Writes ``matched.json`` and ``matched.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery_grid import ROOT, evaluate  # noqa: E402  (one eval.py runner for both scripts)

BENCHMARKS = {
    "humaneval": [
        "benchmark=humaneval",
        "generation.prefill_chunk=16",
        "generation.max_new_tokens=128",
    ],
    "code_ppl": ["benchmark=code_ppl", "benchmark.limit=30"],
    "code_needle": ["benchmark=code_needle", "benchmark.context_tokens=2048", "generation.prefill_chunk=64"],
}
ANCHOR_METHODS = {"anchorcoder": ["method=anchorcoder"], "anllm": ["method=anllm"]}
EVICTION_METHODS = ("l2norm", "streamingllm")


def eviction_ratio(target: float, layers: int, skipped: int) -> float:
    """The compression ratio whose measured reduction is ``target`` when ``skipped`` of ``layers`` stay whole."""
    if skipped >= layers:
        raise SystemExit(f"method.skip_layers holds all {layers} layers: nothing to evict (see --eviction-set)")
    return round(min(target * layers / (layers - skipped), 0.99), 3)


def model_layers(overrides: list[str]) -> int:
    from anchorcoder.models import load_model

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="eval", overrides=overrides), resolve=True)
    return load_model(cfg["model"], cfg.get("device", "auto")).model.config.num_hidden_layers


def skipped_layers(method: list[str]) -> int:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return len(compose(config_name="eval", overrides=method).method.skip_layers)


def quality(metrics: dict) -> str:
    if "quality/ppl" in metrics:
        return f"ppl {metrics['quality/ppl']:.2f}"
    return f"{metrics['quality/problems_solved']}/{metrics['quality/problems']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", nargs="+", default=["method=span"], help="the reference method's overrides")
    parser.add_argument("--adapter", help="a train.py run of the reference method: its trained row too")
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    rows = ["dense", "untrained", "trained", *ANCHOR_METHODS, *EVICTION_METHODS]
    parser.add_argument("--rows", nargs="+", default=rows, choices=rows, help="rows to run (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--eviction-set", action="append", default=[], help="an extra override of the eviction rows (repeatable)"
    )
    parser.add_argument("--limit", type=int, help="first N problems of every benchmark (a quick look)")
    parser.add_argument("--out", default="outputs/matched")
    parser.add_argument("overrides", nargs="*", help="model=..., device=...: for every run")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    layers = model_layers(args.overrides)
    table = json.loads((out / "matched.json").read_text()) if (out / "matched.json").exists() else {}

    for bench in args.benchmarks:
        setting = [*BENCHMARKS[bench], *args.overrides, *([f"benchmark.limit={args.limit}"] if args.limit else [])]
        rows = table.setdefault(bench, {})

        def row(label: str, method: list[str], adapter: str | None = None, rows=rows, setting=setting, bench=bench):
            m = evaluate(out / f"{bench}_{label.replace(' ', '_')}", setting, method, adapter, args.batch_size)
            rows[label] = {"method": method, "adapter": adapter} | m
            (out / "matched.json").write_text(json.dumps(table, indent=2))
            return m

        if "dense" in args.rows:
            row("dense", ["method=dense"])
        if "untrained" in args.rows or not args.adapter:
            reference = row("untrained", args.reference)
        if args.adapter:
            reference = row("trained", args.reference, args.adapter)
        for label, method in ANCHOR_METHODS.items():
            if label in args.rows:
                row(label, method)
        target = reference["kv/reduction_final"]
        for name in (n for n in EVICTION_METHODS if n in args.rows):
            method = [f"method={name}", "method.schedule=every_step", *args.eviction_set]
            ratio = eviction_ratio(target, layers, skipped_layers(method))
            row(f"{name} {ratio}", [*method, f"method.compression_ratio={ratio}"])

    lines = [f"reference: `{' '.join(args.reference)}`" + (f", adapter `{args.adapter}`" if args.adapter else "")]
    for bench, rows in table.items():
        lines += [
            "",
            f"**{bench}**",
            "",
            "| row | quality | KV red. final | peak | new tokens (mean) |",
            "|---|---|---|---|---|",
        ]
        for label, m in rows.items():
            new = m.get("gen/new_tokens_mean")
            lines.append(
                f"| {label} | {quality(m)} | {m['kv/reduction_final']:.3f} | {m['kv/reduction_peak']:.3f} "
                f"| {'' if new is None else f'{new:.1f}'} |"
            )
    (out / "matched.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
