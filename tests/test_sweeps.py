"""Sweeps end in a comparison: the grid sweeper's jobs, W&B grouping, the report, its statistics."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, ROOT, compose_config, wandb_records

from anchorcoder.evaluation import validate
from anchorcoder.reporting.compare import collect, side_by_side, write_report
from anchorcoder.reporting.stats import bootstrap_interval, paired_comparison, sign_test, wilson_interval

TINY_GRID = """# @package _global_
hydra:
  sweeper:
    axes:
      method:
        - method=l2norm method.skip_layers=[] method.compression_ratio=0.25,0.5
        - method=streamingllm method.compression_ratio=0.25,0.5
"""


def sweep_cli(cwd: Path, *overrides: str, wandb_mode: str = "disabled") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "-m", *overrides],
        cwd=cwd,
        # its own W&B service: an in-process test's WANDB_SERVICE would write these runs' files asynchronously
        env={**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "WANDB_MODE": wandb_mode},
        capture_output=True,
        text=True,
        timeout=600,
    )


def dry_run(tmp_path: Path, *overrides: str) -> list[str]:
    result = sweep_cli(tmp_path, *overrides, "hydra.sweeper.dry_run=true", "logger=none")
    assert result.returncode == 0, result.stderr[-2000:]
    return [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("  ")]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A real multirun: tiny model, 2 methods x 2 budgets, 3 HumanEval problems, W&B offline."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "configs" / "sweep").mkdir(parents=True)
    (root / "configs" / "sweep" / "tiny.yaml").write_text(TINY_GRID)
    result = sweep_cli(
        root,
        "+sweep=tiny",
        f"hydra.searchpath=[file://{root / 'configs'}]",
        "model=tiny-llama",
        "benchmark.limit=3",
        "generation.max_new_tokens=8",
        "logger=wandb",
        "logger.mode=offline",
        "hydra.sweep.dir=multirun_tiny",
        wandb_mode="offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "multirun_tiny"


def wandb_run(run_file: str) -> dict:
    out = {"summary": {}}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(group=record.run.run_group, job_type=record.run.job_type, tags=list(record.run.tags))
        elif kind == "summary":
            out["summary"].update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update}
            )
    return out


def test_a_sweep_is_one_wandb_group_with_a_summary_run(tiny_sweep):
    pytest.importorskip("wandb")
    jobs = sorted(p for p in tiny_sweep.iterdir() if (p / "config.yaml").exists())
    assert len(jobs) == 4 and all((job / "metrics.json").exists() for job in jobs)
    runs = [wandb_run(f) for f in sorted(map(str, tiny_sweep.rglob("run-*.wandb")))]
    assert len(runs) == 5
    assert {r["group"] for r in runs} == {"multirun_tiny"}
    assert sorted(r["job_type"] for r in runs) == ["eval"] * 4 + ["summary"]
    evals = [r for r in runs if r["job_type"] == "eval"]
    assert (
        sorted(t for r in evals for t in r["tags"] if t.startswith("method:"))
        == ["method:l2norm"] * 2 + ["method:streamingllm"] * 2
    )
    assert all({"benchmark:humaneval", "model:tiny-llama"} <= set(r["tags"]) for r in evals)
    assert all(r["summary"]["samples/nrows"] == 3 for r in evals)  # the per-sample table
    [summary] = [r for r in runs if r["job_type"] == "summary"]
    assert summary["summary"]["comparison/nrows"] == 4
    assert summary["summary"]["sweep/finished"] == 4 and summary["summary"]["sweep/failed_jobs"] == 0
    assert {"tradeoff_humaneval_tiny-llama/_type", "peak_kv_humaneval_tiny-llama/_type"} <= set(summary["summary"])


def test_the_sweep_report_holds_every_job_with_its_metrics(tiny_sweep):
    rows = json.loads((tiny_sweep / "report.json").read_text())
    assert len(rows) == 4
    for row in rows:
        metrics = json.loads((tiny_sweep.parent / row["folder"] / "metrics.json").read_text())  # relative to the cwd
        assert row["metrics"] == metrics
        assert row["quality"] == pytest.approx(metrics["quality/pass@1"])
    options = sorted((r["method"], r["options"]) for r in rows)
    assert options == [
        ("l2norm", "compression_ratio=0.25"),
        ("l2norm", "compression_ratio=0.5"),
        ("streamingllm", "compression_ratio=0.25"),
        ("streamingllm", "compression_ratio=0.5"),
    ]
    table = (tiny_sweep / "report.md").read_text()
    for row in rows:
        line = next(x for x in table.splitlines() if x.startswith(f"| {row['method']} | {row['options']} |"))
        assert f"| {row['metrics']['kv/reduction_final']:.3f} | {row['metrics']['kv/reduction_peak']:.3f} |" in line
    assert (tiny_sweep / "tradeoff_humaneval_tiny-llama.png").stat().st_size > 10_000


def test_the_report_lists_an_unfinished_run(tiny_sweep, tmp_path):
    job = next(p for p in sorted(tiny_sweep.iterdir()) if (p / "metrics.json").exists())
    shutil.copytree(job, tmp_path / "interrupted", ignore=shutil.ignore_patterns("wandb"))
    (tmp_path / "interrupted" / "metrics.json").unlink()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "anchorcoder.report",
            str(tiny_sweep),
            str(tmp_path / "interrupted"),
            "--out",
            str(tmp_path / "report"),
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(rows) == 5 and [r["finished"] for r in rows].count(False) == 1
    assert f"unfinished: `{tmp_path / 'interrupted'}`" in (tmp_path / "report" / "report.md").read_text()


def test_the_report_pairs_runs_with_dense(tiny_sweep, tmp_path):
    """A dense run of the same problems gives every row its paired counts (here: made from a job's results)."""
    job = next(p for p in sorted(tiny_sweep.iterdir()) if (p / "metrics.json").exists())
    dense = tmp_path / "dense"
    shutil.copytree(job, dense, ignore=shutil.ignore_patterns("wandb"))
    config = yaml.safe_load((dense / "config.yaml").read_text())
    config["method"] = {"name": "dense"}
    (dense / "config.yaml").write_text(yaml.safe_dump(config))
    results = [json.loads(x) for x in (dense / "results.jsonl").read_text().splitlines()]
    for r in results:
        r["passed"] = True  # dense "solves" all three
    (dense / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    runs = collect([tiny_sweep, dense])
    compressed = [r for r in runs if r.method != "dense"]
    for run in compressed:
        solved = int(sum(run.per_problem.values()))
        assert run.vs_dense == {"shared": 3, "a_better": 0, "b_better": 3 - solved, "p": sign_test(0, 3 - solved)}


def test_runs_of_another_setting_get_their_own_table_and_column(tiny_sweep, tmp_path):
    job = next(p for p in sorted(tiny_sweep.iterdir()) if (p / "metrics.json").exists())
    other = tmp_path / "other"
    shutil.copytree(job, other, ignore=shutil.ignore_patterns("wandb"))
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["generation"]["max_new_tokens"] = 16  # another setting: not comparable problem by problem
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    runs = collect([tiny_sweep, other])
    assert len({r.table for r in runs}) == 2
    assert [r.table for r in runs if r.folder == str(other)] == ["humaneval (tiny-llama, generation.max_new_tokens=16)"]
    wide = side_by_side(runs).splitlines()
    header = next(line for line in wide if line.startswith("| method"))
    assert "generation.max_new_tokens=8" in header and "generation.max_new_tokens=16" in header
    assert len([line for line in wide if line.startswith("| l2norm") or line.startswith("| streamingllm")]) == 4


def test_the_sweep_refuses_a_bad_job_before_any_model_loads(tmp_path):
    result = sweep_cli(
        tmp_path, "method=l2norm,streamingllm", "method.compression_ratio=0.5,1.5", "logger=none", "model=tiny-llama"
    )
    assert result.returncode != 0
    assert "sweep job 1 (" in result.stderr and "compression_ratio" in result.stderr
    assert not list(tmp_path.rglob("config.yaml")) and "Loading weights" not in result.stderr


def test_named_grids_list_their_jobs(tmp_path):
    pareto = dry_run(tmp_path, "+sweep=pareto", "benchmark=humaneval")
    assert len(pareto) == 12  # dense, 2 x 4 budgets, anllm, anchorcoder, span (no adapters given)
    assert sum("method=l2norm" in job for job in pareto) == 4 and not any("adapter" in job for job in pareto)
    adapter = tmp_path / "train_run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    trained = dry_run(tmp_path, "+sweep=pareto", "benchmark=humaneval", f"adapters.anchorcoder={adapter}")
    assert len(trained) == 13 and trained[-2].startswith(f"method=anchorcoder model.adapter={adapter} ")
    assert len(dry_run(tmp_path, "+sweep=ablation_anchorcoder")) == 9
    assert len(dry_run(tmp_path, "+sweep=pareto_smollm2")) == 27
    crossed = dry_run(tmp_path, "+sweep=ablation_anchorcoder", "benchmark=code_ppl,code_needle")
    assert len(crossed) == 18


def test_a_grid_and_the_command_line_may_not_both_set_a_key(tmp_path):
    result = sweep_cli(tmp_path, "+sweep=pareto", "method=anllm", "logger=none")
    assert result.returncode != 0 and "the sweep's grid already sets method" in result.stderr


@pytest.mark.parametrize("sweep_file", sorted(p.name for p in (CONFIGS / "wandb_sweep").glob("*.yaml")))
def test_every_wandb_sweep_point_composes_and_validates(sweep_file):
    spec = yaml.safe_load((CONFIGS / "wandb_sweep" / sweep_file).read_text())
    assert spec["program"] == "eval.py" and "${args_no_hyphens}" in spec["command"]
    grid = {k: v["values"] if "values" in v else [v["value"]] for k, v in spec["parameters"].items()}
    points = list(itertools.product(*grid.values()))
    assert len(points) >= 4
    for point in points:  # W&B passes each as key=value, lower-case booleans as YAML writes them
        overrides = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in zip(grid, point, strict=True)]
        cfg = compose_config(overrides=overrides)
        validate(cfg)
        for key, value in zip(grid, point, strict=True):
            node = cfg
            for part in key.split("."):
                node = node[part] if part in node else node
            assert node == value or node.get("name") == value


# ----------------------------------------------------------------------------------- the statistics
def test_wilson_interval_matches_a_hand_computation():
    # 10 of 40, z = 1.96: centre (0.25 + 1.96^2/80) / (1 + 1.96^2/40) = 0.27190,
    # half-width 1.96 / 1.09604 * sqrt(0.25 * 0.75 / 40 + 1.96^2 / 6400) = 0.13003
    low, high = wilson_interval(10, 40, z=1.96)
    assert low == pytest.approx(0.14187, abs=5e-5) and high == pytest.approx(0.40193, abs=5e-5)
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(3, 3)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(4, 3)


def test_sign_test_is_the_exact_binomial_tail():
    assert sign_test(7, 1) == pytest.approx(2 * 9 / 256)  # P(X <= 1 | n=8, 1/2) = (1 + 8) / 256, two-sided
    assert sign_test(1, 7) == sign_test(7, 1)
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(0, 10) == pytest.approx(2 / 1024)


def test_paired_comparison_counts_the_problems_each_solves_alone():
    a = {"t1": 1.0, "t2": 0.0, "t3": 1.0, "t4": 0.0, "t5": 1.0}
    b = {"t1": 0.0, "t2": 0.0, "t3": 1.0, "t4": 1.0, "t6": 1.0}
    assert paired_comparison(a, b) == {"shared": 4, "a_better": 1, "b_better": 1, "p": 1.0}
    nll_a, nll_b = {"x": 1.0, "y": 2.0, "z": 3.0}, {"x": 1.5, "y": 2.5, "z": 2.0}
    assert paired_comparison(nll_a, nll_b, higher_is_better=False)["a_better"] == 2  # lower NLL wins


def test_bootstrap_interval_is_seeded_and_agrees_with_wilson_on_pass_fail():
    scores = [1.0] * 10 + [0.0] * 30
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    first, again = bootstrap_interval(scores, mean), bootstrap_interval(scores, mean)
    assert first == again
    wilson = wilson_interval(10, 40)
    assert first[0] == pytest.approx(wilson[0], abs=0.04) and first[1] == pytest.approx(wilson[1], abs=0.04)
    pooled = lambda items: math.exp(sum(n for n, _ in items) / sum(t for _, t in items))  # noqa: E731
    low, high = bootstrap_interval([(10.0, 10), (20.0, 10), (5.0, 10)], pooled)
    assert math.exp(0.5) <= low <= pooled([(10.0, 10), (20.0, 10), (5.0, 10)]) <= high <= math.exp(2.0)


def test_write_report_on_an_empty_folder_writes_an_empty_report(tmp_path):
    runs, images = write_report([tmp_path], tmp_path / "out")
    assert runs == [] and images == [] and (tmp_path / "out" / "report.md").exists()
