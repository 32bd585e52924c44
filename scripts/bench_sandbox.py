"""Sandbox throughput: MBPP's reference solutions per second, this tree against a baseline revision.

    python scripts/bench_sandbox.py --baseline 243455b            # the sandbox before the sealed verdict
    python scripts/bench_sandbox.py --baseline HEAD~3 --limit 200 --rounds 3 --workers 2

The baseline is checked out into a temporary git worktree; each round scores the same programs with
each tree in turn (in a subprocess with that tree first on ``sys.path``), so both see the same load.
Prints programs/s per round, the median ratio, and the verdicts' agreement; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import json, sys, time
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from anchorcoder.benchmarks import ExecutionSettings, build_benchmark
with initialize_config_dir(config_dir=TREE + "/configs", version_base="1.3"):
    cfg = compose(config_name="eval", overrides=["benchmark=mbpp", f"benchmark.limit={LIMIT}"])
bench = build_benchmark(OmegaConf.to_container(cfg, resolve=True)["benchmark"])
problems = bench.problems()
started = time.perf_counter()
verdicts = bench.check(problems, [p.data["code"] for p in problems], "completion", ExecutionSettings(workers=WORKERS))
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "programs": len(problems), "passed": [v.passed for v in verdicts]}))
"""


def measure(tree: Path, limit: int, workers: int, data: str) -> dict:
    code = MEASURE.replace("LIMIT", repr(limit)).replace("WORKERS", str(workers)).replace("TREE", repr(str(tree)))
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r})\n{code}"],
        check=True, capture_output=True, text=True, cwd=tree, env={**os.environ, "ANCHORCODER_DATA": data},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a git revision of this repository")
    parser.add_argument("--limit", type=int, default=500, help="first N MBPP test problems")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the data folder (paths.data_dir)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True)
        try:
            rounds = []
            for r in range(args.rounds):
                this = measure(ROOT, args.limit, args.workers, args.data)
                base = measure(baseline, args.limit, args.workers, args.data)
                rounds.append({"this": this, "baseline": base})
                print(
                    f"round {r + 1}: this {this['programs'] / this['seconds']:.1f} programs/s, "
                    f"baseline {base['programs'] / base['seconds']:.1f}", flush=True,
                )  # fmt: skip
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False)
    ratios = [(r["baseline"]["seconds"] / r["this"]["seconds"]) for r in rounds]
    same = all(r["this"]["passed"] == r["baseline"]["passed"] for r in rounds)
    report = {
        "baseline": args.baseline, "programs": rounds[0]["this"]["programs"], "workers": args.workers,
        "this_programs_per_s": [r["this"]["programs"] / r["this"]["seconds"] for r in rounds],
        "baseline_programs_per_s": [r["baseline"]["programs"] / r["baseline"]["seconds"] for r in rounds],
        "ratio_median": statistics.median(ratios), "ratios": ratios, "same_verdicts": same,
        "passed": sum(rounds[0]["this"]["passed"]),
    }  # fmt: skip
    print(f"this / baseline throughput: {report['ratio_median']:.2f}x (median of {ratios}); same verdicts: {same}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
