"""One eval run as N processes x 1 thread (torchrun) against 1 process x N threads, same machine, same run.

Both are real ``eval.py`` runs of the same config into their own folders; the table gives each one's
wall time (model load and scoring included), the engine's summed decode tokens/s and the slowest
process's generation wall time, and how many samples have identical tokens in the two runs
(thread count changes the order of float sums, so a rare greedy tie may flip).

    python scripts/bench_data_parallel.py                             # HumanEval first 40, SmolLM2, dense, chat
    python scripts/bench_data_parallel.py --processes 2 benchmark.limit=10 model=tiny-llama

Writes ``outputs/bench/data_parallel_<time>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["benchmark=humaneval", "benchmark.limit=40", "generation.max_new_tokens=128", "generation.batch_size=8"]


def run(folder: Path, processes: int, threads: int, overrides: list[str]) -> dict:
    launch = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    command = [*launch, "eval.py", *overrides, "logger=none", f"hydra.run.dir={folder}"]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    metrics = json.loads((folder / "metrics.json").read_text())
    return {
        "processes": processes,
        "threads_per_process": threads,
        "command_wall_s": wall,
        "decode_tokens_per_s": metrics["speed/decode_tokens_per_s"],
        "generation_wall_s": metrics["speed/wall_s"],
        "pass@1": metrics["quality/pass@1"],
        "n_samples": metrics["n_samples"],
    }


def tokens(folder: Path) -> dict:
    lines = (folder / "generations.jsonl").read_text().splitlines()
    return {(r["task_id"], r["sample_index"]): r["token_ids"] for r in map(json.loads, lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="eval.py overrides, after the defaults " + " ".join(DEFAULT))
    args = parser.parse_args()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    base = ROOT / "outputs" / "bench" / f"data_parallel_{stamp}"
    overrides = [*DEFAULT, *args.overrides]
    n = args.processes
    rows = [run(base / "threads", 1, n, overrides), run(base / "processes", n, 1, overrides)]
    one, many = tokens(base / "threads"), tokens(base / "processes")
    same = sum(one[k] == many.get(k) for k in one)
    result = {
        "overrides": overrides,
        "cpu_count": os.cpu_count(),
        "runs": rows,
        "identical_samples": same,
        "samples": len(one),
    }
    result["wall_ratio"] = rows[0]["command_wall_s"] / rows[1]["command_wall_s"]
    result["decode_tok_s_ratio"] = rows[1]["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    out = ROOT / "outputs" / "bench" / f"data_parallel_{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"eval.py {' '.join(overrides)}  ({os.cpu_count()} CPUs)\n")
    print("| layout | wall s (whole run) | generation wall s (slowest process) | decode tok/s (summed) | pass@1 |")
    print("|---|---|---|---|---|")
    for r in rows:
        layout = f"{r['processes']} process{'es' if r['processes'] > 1 else ''} x {r['threads_per_process']} thread{'s' if r['threads_per_process'] > 1 else ''}"
        print(
            f"| {layout} | {r['command_wall_s']:.1f} | {r['generation_wall_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['pass@1']:.3f} |"
        )
    print(
        f"\n{n} processes / 1 process: whole-run wall x{1 / result['wall_ratio']:.2f}, decode tok/s x{result['decode_tok_s_ratio']:.2f}; "
        f"identical tokens in {same}/{len(one)} samples. {out}"
    )


if __name__ == "__main__":
    main()
