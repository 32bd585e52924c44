"""Continuous batching against batch-by-batch decoding, in one process, on a real evaluation's prompts.

The prompts, stop strings and settings are an ``eval.py`` run's (composed from the same configs, so
any override applies): by default dense SmolLM2 on all 164 HumanEval chat prompts, greedy, EOS
honoured, 512 new tokens at most, batch 8. Generation only (no sandbox). Both modes run on the same
loaded model, one after the other (``--order`` picks which first); every completion must be
identical (greedy), and the table gives generated tokens / wall time for each and their ratio.

    python scripts/bench_batching.py                                   # HumanEval-164, batch 8
    python scripts/bench_batching.py benchmark.limit=16 generation.max_new_tokens=64 model=tiny-llama

Writes ``outputs/bench/batching_<time>.json`` (+ ``.md``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from anchorcoder.api import compose, load, prepare
from anchorcoder.evaluation.run import benchmark_inputs, validate
from anchorcoder.generation import GenerationEngine

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["logger=none", "generation.batch_size=8"]


def run_mode(loaded, method, settings, prompts: list[list[int]], continuous: bool) -> dict:
    engine = GenerationEngine(loaded.model, loaded.tokenizer, method, replace(settings, continuous_batching=continuous))
    label = "continuous" if continuous else "batch by batch"
    with tqdm(total=len(prompts), desc=label, unit="prompt") as bar:
        results = engine.generate(prompts, on_result=lambda _: bar.update(1))
    stats = engine.stats
    return {
        "continuous_batching": continuous,
        "wall_s": stats.wall_s,
        "generated_tokens": stats.generated_tokens,
        "tokens_per_s": stats.generated_tokens / stats.wall_s,
        "prefills": len(stats.prefill_s),
        "prefill_s": sum(stats.prefill_s),
        "decode_forwards_tokens": stats.decode_tokens,
        "texts": [r.text for r in results],
        "token_ids": [r.token_ids for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", choices=("static-first", "continuous-first"), default="static-first")
    parser.add_argument("overrides", nargs="*", help=f"eval.py overrides (added to {' '.join(DEFAULTS)})")
    args = parser.parse_args()
    cfg = compose(*DEFAULTS, *args.overrides)
    parts = validate(cfg)
    loaded = load(*DEFAULTS, *args.overrides)
    method, benchmark = prepare(loaded, parts.method), parts.benchmark
    style = benchmark.prompt_style or cfg["model"]["prompt_style"]
    _, prompts, stop, _ = benchmark_inputs(benchmark, method, loaded.tokenizer, style)
    settings = replace(parts.settings, stop=stop)

    order = (False, True) if args.order == "static-first" else (True, False)
    runs = {continuous: run_mode(loaded, method, settings, prompts, continuous) for continuous in order}
    static, continuous = runs[False], runs[True]
    identical = sum(a == b for a, b in zip(static["token_ids"], continuous["token_ids"], strict=True))
    report = {
        "model": cfg["model"]["name"],
        "method": cfg["method"]["name"],
        "benchmark": benchmark.name,
        "prompts": len(prompts),
        "batch_size": settings.batch_size,
        "max_new_tokens": settings.max_new_tokens,
        "order": args.order,
        "identical_completions": identical,
        "speedup_tokens_per_s": continuous["tokens_per_s"] / static["tokens_per_s"],
        "runs": [{k: v for k, v in r.items() if k not in ("texts", "token_ids")} for r in (static, continuous)],
        "texts": {"batch_by_batch": static["texts"], "continuous": continuous["texts"]},
    }
    lines = [
        f"{report['model']}, {report['method']}, {report['benchmark']} ({len(prompts)} prompts, {style}), greedy, "
        f"EOS honoured, <= {settings.max_new_tokens} new tokens, batch {settings.batch_size}, {args.order}",
        "",
        "| decoding | wall s | generated tokens | tokens/s | prefills |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("batch by batch", static), ("continuous", continuous)):
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {r['generated_tokens']} | {r['tokens_per_s']:.1f} | {r['prefills']} |"
        )
    lines += [
        "",
        f"continuous / batch by batch tokens/s: {report['speedup_tokens_per_s']:.2f}; "
        f"identical completions: {identical}/{len(prompts)}",
    ]
    out = ROOT / "outputs" / "bench" / f"batching_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out} (+ .md)")


if __name__ == "__main__":
    main()
