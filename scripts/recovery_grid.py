"""The recovery grid: train anchor-method variants with train.py, then evaluate each through eval.py
with ``model.adapter`` on HumanEval and MBPP (chat, greedy), code_ppl and code_needle, with the KV
reduction measured on the same runs, next to the untrained dense model on the same problems.

    python scripts/recovery_grid.py --rows taa_distill gated_distill --minutes 20
    python scripts/recovery_grid.py --list                          # the row presets
    python scripts/recovery_grid.py --rows taa_distill --curve      # + code_ppl / HumanEval at every checkpoint
    python scripts/recovery_grid.py --rows taa_distill --set model=qwen2.5-coder-1.5b device=cuda

Every step is a real train.py / eval.py run in ``--out``; a finished one (its metrics.json) is
reused, so an interrupted grid continues where it stopped. Writes ``grid.json``, ``grid.md`` and, with
``--curve``, ``curve.json`` and ``curve.png`` (quality against training tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = [  # LoRA, lr 3e-4 constant after 5 warm-up steps, stop on time, every checkpoint kept (the curve)
    "trainer=lora", "trainer.max_steps=100000", "trainer.learning_rate=3e-4", "trainer.warmup_steps=5",
    "trainer.save_steps=15", "trainer.save_total_limit=null", "trainer.eval_steps=0", "trainer.logging_steps=5",
    "logger=none",
]  # fmt: skip
SELF_DISTILL = [
    "data=self_distill",
    "data.max_prompts=320",
    "data.generation.max_new_tokens=256",
    "trainer.batch_size=4",
]
RAW_CODE = ["data=python_stdlib"]

# name -> (method overrides, train.py overrides); method overrides are used for eval.py as well
ROWS = {
    "taa_ce_raw": (["method=anchorcoder", "method.laa=false"], RAW_CODE),
    "laa_ce_raw": (["method=anchorcoder"], RAW_CODE),
    "gated_ce_raw": (["method=anchorcoder", "method.laa_gate=true"], RAW_CODE),
    "taa_distill": (["method=anchorcoder", "method.laa=false"], [*SELF_DISTILL, "trainer.objective=distill"]),
    "laa_distill": (["method=anchorcoder"], [*SELF_DISTILL, "trainer.objective=distill"]),
    "gated_distill": (["method=anchorcoder", "method.laa_gate=true"], [*SELF_DISTILL, "trainer.objective=distill"]),
    "taa_ce_chat": (["method=anchorcoder", "method.laa=false"], [*SELF_DISTILL, "trainer.objective=ce"]),
    "taa_mix": (["method=anchorcoder", "method.laa=false"], [*SELF_DISTILL, "trainer.objective=mix"]),
    "taa_distill_prompt_whole": (
        ["method=anchorcoder", "method.laa=false", "method.compress_prompt=false"],
        [*SELF_DISTILL, "trainer.objective=distill"],
    ),
    "anllm_distill": (["method=anllm"], [*SELF_DISTILL, "trainer.objective=distill"]),
    # span refuses distillation (the teacher never saw the sentinel stream): CE on the spans it will meet
    "span_lines_ce_raw": (["method=span", "method.training_policy=inference"], RAW_CODE),
}


def run(script: str, overrides: list[str]) -> None:
    command = [sys.executable, str(ROOT / script), *overrides]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


MODEL_OVERRIDES = ()  # model=..., model.*, device=...: what eval.py needs of the extra train.py overrides


def evaluate(folder: Path, benchmark: list[str], method: list[str], adapter: str | None, batch_size: int) -> dict:
    """One eval.py run into ``folder`` (reused when finished): its metrics and per-sample reductions."""
    if not (folder / "metrics.json").exists():
        overrides = [
            *benchmark,
            *method,
            *MODEL_OVERRIDES,
            f"generation.batch_size={batch_size}",
            "logger=none",
            f"hydra.run.dir={folder}",
        ]
        run("eval.py", overrides + ([f"model.adapter={adapter}"] if adapter else []))
    metrics = json.loads((folder / "metrics.json").read_text())
    kv = [json.loads(line)["kv"] for line in (folder / "results.jsonl").read_text().splitlines()]
    metrics["kv/reduction_final_per_sample"] = statistics.mean(
        1 - k["bytes_final"] / k["dense_bytes_final"] for k in kv
    )
    metrics["kv/reduction_peak_per_sample"] = statistics.mean(1 - k["bytes_peak"] / k["dense_bytes_peak"] for k in kv)
    return metrics


def benchmarks(args) -> dict[str, list[str]]:
    return {
        "humaneval": ["benchmark=humaneval", f"benchmark.limit={args.humaneval}"],
        "mbpp": ["benchmark=mbpp", f"benchmark.limit={args.mbpp}", "model.prompt_style=chat"],
        "code_ppl": ["benchmark=code_ppl", "benchmark.sources=[humaneval]", f"benchmark.limit={args.ppl}"],
        "code_needle": ["benchmark=code_needle", "benchmark.context_tokens=2048", f"benchmark.limit={args.needle}"],
    }


def summary(results: dict[str, dict]) -> dict:
    he, mbpp, ppl, needle = (results.get(k, {}) for k in ("humaneval", "mbpp", "code_ppl", "code_needle"))
    return {
        "humaneval_solved": he.get("quality/problems_solved"),
        "humaneval_problems": he.get("quality/problems"),
        "mbpp_solved": mbpp.get("quality/problems_solved"),
        "mbpp_problems": mbpp.get("quality/problems"),
        "code_ppl": ppl.get("quality/ppl"),
        "needle_solved": needle.get("quality/problems_solved"),
        "needle_problems": needle.get("quality/problems"),
        "humaneval_reduction_final": he.get("kv/reduction_final"),
        "humaneval_reduction_final_per_sample": he.get("kv/reduction_final_per_sample"),
        "humaneval_reduction_peak": he.get("kv/reduction_peak"),
        "humaneval_reduction_peak_per_sample": he.get("kv/reduction_peak_per_sample"),
        "mbpp_reduction_final": mbpp.get("kv/reduction_final"),
        "needle_reduction_final": needle.get("kv/reduction_final"),
    }


def train_info(train_run: Path) -> dict:
    metrics = json.loads((train_run / "metrics.json").read_text())
    log = [json.loads(line) for line in (train_run / "train_log.jsonl").read_text().splitlines()]
    speeds = [e["tokens_per_s"] for e in log if "tokens_per_s" in e]
    seen = [(e["step"], e["tokens_seen"]) for e in log if "tokens_seen" in e]
    return {
        "steps": metrics["steps"], "minutes": round(metrics["train_seconds"] / 60, 1),
        "train_tokens_seen": seen[-1][1] if seen else None, "tokens_seen_by_step": seen,
        "corpus_tokens": metrics["train_tokens"], "tokens_per_s": statistics.median(speeds) if speeds else None,
    }  # fmt: skip


def curve(out: Path, name: str, method: list[str], args) -> list[dict]:
    """code_ppl and HumanEval at every checkpoint of a row's run (quality against training tokens)."""
    train_run = out / f"train_{name}"
    info = train_info(train_run)
    points = []
    for checkpoint in sorted(train_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(checkpoint.name.split("-")[1])
        tag = f"{name}_step{step}"
        ppl = evaluate(out / f"{tag}_code_ppl", benchmarks(args)["code_ppl"], method, str(checkpoint), args.batch_size)
        he_limit = ["benchmark=humaneval", f"benchmark.limit={args.curve_humaneval}"]
        he = evaluate(out / f"{tag}_humaneval", he_limit, method, str(checkpoint), args.batch_size)
        logged = [tokens for at, tokens in info["tokens_seen_by_step"] if at <= step]
        points.append({
            "step": step, "tokens": logged[-1] if logged else 0,
            "code_ppl": ppl["quality/ppl"], "humaneval_solved": he["quality/problems_solved"],
        })  # fmt: skip
    (out / "curve.json").write_text(json.dumps({name: points}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(6, 3.5))
    tokens = [p["tokens"] / 1e3 for p in points]
    left.plot(tokens, [p["code_ppl"] for p in points], "o-", color="tab:blue")
    left.set_xlabel("training tokens (thousands)")
    left.set_ylabel("code_ppl (HumanEval solutions)", color="tab:blue")
    right = left.twinx()
    right.plot(tokens, [p["humaneval_solved"] for p in points], "s--", color="tab:red")
    right.set_ylabel(f"HumanEval solved (of {args.curve_humaneval})", color="tab:red")
    left.set_title(f"{name}: quality against training")
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["taa_distill", "gated_distill"])
    parser.add_argument("--list", action="store_true", help="print the row presets and exit")
    parser.add_argument("--minutes", type=float, default=40, help="training time per row")
    parser.add_argument("--humaneval", type=int, default=164, help="HumanEval problems (first N)")
    parser.add_argument("--mbpp", type=int, default=200, help="MBPP test problems (first N)")
    parser.add_argument("--ppl", type=int, default=40, help="HumanEval solutions in code_ppl")
    parser.add_argument("--needle", type=int, default=20, help="code_needle problems (2,048 tokens)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--curve", action="store_true", help="evaluate every checkpoint of the first row")
    parser.add_argument("--curve-humaneval", type=int, default=20, help="HumanEval problems at each checkpoint")
    parser.add_argument("--out", default="outputs/recovery_grid")
    parser.add_argument(
        "--no-dense", action="store_true",
        help="skip the untrained dense model's runs (compare with a dense grid measured before)",
    )  # fmt: skip
    parser.add_argument(
        "--method-set", nargs="*", default=[],
        help="method options for every row, in training and evaluation (method.anchors_see_anchors=true)",
    )  # fmt: skip
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        help="extra train.py overrides for every row (model=..., which eval.py gets too)",
    )
    args = parser.parse_args()
    if args.list:
        for name, (method, train) in ROWS.items():
            print(f"{name:28s} {' '.join(method)}  |  {' '.join(train)}")
        return
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")

    global MODEL_OVERRIDES
    MODEL_OVERRIDES = tuple(o for o in args.overrides if o.split("=")[0].split(".")[0] in ("model", "device"))
    out = (ROOT / args.out).resolve()
    # rows measured by earlier calls into the same --out stay in grid.json
    grid = json.loads((out / "grid.json").read_text()) if (out / "grid.json").exists() else {}
    if not args.no_dense:
        dense = {
            b: evaluate(out / f"dense_{b}", o, ["method=dense"], None, args.batch_size)
            for b, o in benchmarks(args).items()
        }
        grid["dense (untrained)"] = summary(dense)
    for name in args.rows:
        method, train = ROWS[name]
        method = [*method, *args.method_set]
        train_run = out / f"train_{name}"
        if not (train_run / "metrics.json").exists():
            resume = ["trainer.resume=true"] if any(train_run.glob("checkpoint-*")) else []
            run("train.py", [*method, *TRAIN, *train, f"trainer.max_minutes={args.minutes}", *args.overrides,
                             *resume, f"hydra.run.dir={train_run}"])  # fmt: skip
        results = {
            b: evaluate(out / f"{name}_{b}", o, method, str(train_run), args.batch_size)
            for b, o in benchmarks(args).items()
        }
        grid[name] = summary(results) | train_info(train_run) | {"method": method, "train": [*train, *args.overrides]}
        (out / "grid.json").write_text(json.dumps(grid, indent=2))
    lines = [
        "| row | HumanEval solved | MBPP solved | code_ppl | code_needle 2k | KV red. HumanEval final: agg / per sample "
        "| peak: agg / per sample | train min | train tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in grid.items():
        lines.append(
            f"| {name} | {r['humaneval_solved']}/{r['humaneval_problems']} | {r['mbpp_solved']}/{r['mbpp_problems']} "
            f"| {r['code_ppl']:.2f} | {r['needle_solved']}/{r['needle_problems']} "
            f"| {r['humaneval_reduction_final']:.3f} / {r['humaneval_reduction_final_per_sample']:.3f} "
            f"| {r['humaneval_reduction_peak']:.3f} / {r['humaneval_reduction_peak_per_sample']:.3f} "
            f"| {r.get('minutes', '')} | {r.get('train_tokens_seen', '')} |"
        )
    report = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps(grid, indent=2))
    (out / "grid.md").write_text(report + "\n")
    print(report)
    if args.curve:
        print(json.dumps(curve(out, args.rows[0], [*ROWS[args.rows[0]][0], *args.method_set], args), indent=2))


if __name__ == "__main__":
    main()
