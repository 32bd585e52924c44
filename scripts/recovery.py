"""Does training under the anchor mask recover what anchor pruning costs? (the recovery experiment)

For each method: LoRA-train it with train.py for ``--minutes`` on the offline corpus, then measure
``code_ppl`` on held-out code (HumanEval canonical solutions after their prompts; the training
data's guard keeps HumanEval out) under real pruned inference, teacher-forced through the engine:

  (a) dense, untrained                 the reference
  (b) the method's pruning, untrained  what pruning costs
  (c) the method's pruning, trained    what training recovers: ``gap closed`` = (b - c) / (b - a) in nll/token
  (d) dense, trained                   whether the adapter hurt plain decoding

    python scripts/recovery.py --methods anchorcoder anllm --minutes 20
    python scripts/recovery.py --methods anchorcoder --train-run anchorcoder=outputs/train/<run>   # reuse a run

Each row's KV reduction is measured on the same run (bytes held / dense bytes of the same samples).
Writes ``recovery.json`` and ``recovery.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = [  # LoRA, lr 3e-4 constant after 5 warm-up steps, rows of 2 x 1,024 tokens, stop on time
    "trainer=lora", "trainer.max_steps=100000", "trainer.learning_rate=3e-4", "trainer.warmup_steps=5",
    "trainer.save_steps=25", "trainer.eval_steps=40", "trainer.eval_rows=8", "trainer.logging_steps=5",
]  # fmt: skip


def run(script: str, overrides: list[str]) -> None:
    command = [sys.executable, str(ROOT / script), *overrides]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def code_ppl(folder: Path, method: str, adapter: str | None, limit: int, batch_size: int) -> dict:
    """Evaluate once into ``folder`` (a finished folder is reused); metrics + per-sample reduction."""
    if not (folder / "metrics.json").exists():
        overrides = [
            "benchmark=code_ppl", "benchmark.sources=[humaneval]", f"benchmark.limit={limit}", f"method={method}",
            f"generation.batch_size={batch_size}", "logger=none", f"hydra.run.dir={folder}",
        ]  # fmt: skip
        run("eval.py", overrides + ([f"model.adapter={adapter}"] if adapter else []))
    metrics = json.loads((folder / "metrics.json").read_text())
    samples = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    per_sample = statistics.mean(1 - s["kv"]["bytes_final"] / s["kv"]["dense_bytes_final"] for s in samples)
    return {
        "ppl": metrics["quality/ppl"],
        "nll_per_token": metrics["quality/nll_per_token"],
        "reduction_final": metrics["kv/reduction_final"],
        "reduction_final_per_sample": per_sample,
        "reduction_peak": metrics["kv/reduction_peak"],
        "folder": str(folder),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["anchorcoder", "anllm"])
    parser.add_argument("--minutes", type=float, default=20, help="training time per method (the issue allows 45)")
    parser.add_argument("--limit", type=int, default=40, help="HumanEval problems in code_ppl")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-run", nargs="*", default=[], help="method=folder: use this finished train.py run")
    parser.add_argument("--out", default="outputs/recovery")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (model=..., data.seq_len=...)")
    args = parser.parse_args()

    out = (ROOT / args.out).resolve()
    given = dict(item.split("=", 1) for item in args.train_run)
    rows = {"(a) dense, untrained": code_ppl(out / "dense_untrained", "dense", None, args.limit, args.batch_size)}
    closed = {}
    for method in args.methods:
        train_run = Path(given.get(method) or out / f"train_{method}").resolve()
        if not (train_run / "metrics.json").exists():
            overrides = [f"method={method}", f"trainer.max_minutes={args.minutes}", *TRAIN, *args.overrides]
            run("train.py", [*overrides, f"hydra.run.dir={train_run}"])
        b = code_ppl(out / f"{method}_untrained", method, None, args.limit, args.batch_size)
        c = code_ppl(out / f"{method}_trained", method, str(train_run), args.limit, args.batch_size)
        d = code_ppl(out / f"dense_trained_{method}", "dense", str(train_run), args.limit, args.batch_size)
        trained = json.loads((train_run / "metrics.json").read_text())
        rows[f"(b) {method}, untrained"] = b
        rows[f"(c) {method}, trained ({trained['steps']} steps, {trained['train_seconds'] / 60:.0f} min)"] = c
        rows[f"(d) dense, {method}-trained adapter"] = d
        a = rows["(a) dense, untrained"]
        closed[method] = (b["nll_per_token"] - c["nll_per_token"]) / (b["nll_per_token"] - a["nll_per_token"])

    lines = [
        "| row | code_ppl | nll/token | KV reduction, final: aggregate / per sample | at the peak |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['ppl']:.2f} | {r['nll_per_token']:.3f} | "
            f"{r['reduction_final']:.3f} / {r['reduction_final_per_sample']:.3f} | {r['reduction_peak']:.3f} |"
        )
    lines += [
        "",
        *(
            f"- {m}: training closes {100 * g:.1f} % of the gap (nll/token) between (b) and (a)"
            for m, g in closed.items()
        ),
    ]
    report = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recovery.md").write_text(report + "\n")
    (out / "recovery.json").write_text(json.dumps({"rows": rows, "gap_closed": closed}, indent=2))
    print(report)


if __name__ == "__main__":
    main()
