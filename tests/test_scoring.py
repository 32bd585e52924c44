"""Scoring by execution through the benchmarks' own path: reference solutions pass, wrong ones fail."""

from __future__ import annotations

import json
import time

import pytest
from conftest import compose_config

from anchorcoder.benchmarks import ExecutionSettings, build_benchmark
from anchorcoder.evaluation import run_eval, validate
from anchorcoder.registry import ConfigError

# MBPP test-split tasks whose reference solution fails its own asserts (see the README): 341 turns a
# set into a tuple and expects one iteration order, which CPython does not give for {6, ..., 11}.
EXPECTED_MBPP_FAILURES = {"MBPP/341": "failed: AssertionError"}


def benchmark(name: str, *overrides: str):
    return build_benchmark(compose_config(overrides=[f"benchmark={name}", *overrides])["benchmark"])


def score(bench, problems, completions, style="completion"):
    started = time.perf_counter()
    verdicts = bench.check(problems, completions, style, ExecutionSettings(workers=2))
    return verdicts, time.perf_counter() - started


def reference_failures(name: str, solution_key: str) -> tuple[dict[str, str], float, int]:
    """Score a benchmark's own reference solutions: {task id: reason} of those that fail, seconds, count."""
    bench = benchmark(name)
    problems = bench.problems()
    verdicts, elapsed = score(bench, problems, [p.data[solution_key] for p in problems])
    failed = {p.task_id: v.reason for p, v in zip(problems, verdicts, strict=True) if not v.passed}
    print(f"{len(problems)} {name} reference solutions scored in {elapsed:.1f} s; failing: {failed}")
    return failed, elapsed, len(problems)


def test_canonical_humaneval_solutions_all_pass_within_a_minute():
    failed, elapsed, count = reference_failures("humaneval", "canonical_solution")
    assert failed == {} and count == 164
    assert elapsed < 60


def test_known_wrong_completions_fail_with_their_reason():
    he = benchmark("humaneval")
    problems = he.problems()[:6]
    wrong = [
        "    return None\n",
        "    pass\n",
        "    return 1 / 0\n",
        "    return (\n",  # syntax error
        problems[0].data["canonical_solution"],  # a correct body for another problem
        "    import sys\n    sys.exit(0)\n",  # leaves before the tests run
    ]
    verdicts, _ = score(he, problems, wrong)
    assert [v.passed for v in verdicts] == [False] * 6
    reasons = [v.reason for v in verdicts]
    assert "ZeroDivisionError" in reasons[2] and "SyntaxError" in reasons[3]
    assert "exit" in reasons[5]


@pytest.mark.slow  # the whole data set in the sandbox (about 30 s); make test-slow
def test_mbpp_reference_solutions_pass():
    failed, _, count = reference_failures("mbpp", "code")
    assert failed == EXPECTED_MBPP_FAILURES and count == 500


@pytest.mark.slow  # the whole data set in the sandbox (about 30 s); make test-slow
def test_humaneval_plus_canonical_solutions_pass():
    failed, _, count = reference_failures("humaneval_plus", "canonical_solution")
    assert failed == {} and count == 164


def test_execution_settings_name_their_key():
    with pytest.raises(ConfigError, match=r"execution.workers must be an integer >= 1"):
        validate(compose_config(overrides=["execution.workers=0"]))
    with pytest.raises(ConfigError, match=r"execution.max_processes must be an integer >= 0"):
        validate(compose_config(overrides=["execution.max_processes=-1"]))
    with pytest.raises(ConfigError, match=r"unknown execution option"):
        validate(compose_config(overrides=["+execution.network=true"]))


def test_humaneval_run_records_verdicts_per_sample(tmp_path):
    overrides = ["model=tiny-llama", "logger=none", "benchmark.limit=3", "generation.max_new_tokens=8"]
    metrics = run_eval(compose_config(overrides=overrides), tmp_path)
    assert metrics["quality/pass@1"] == 0.0 and metrics["quality/problems"] == 3  # random weights
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in results] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for r in results:
        assert r["passed"] is False and r["reason"] and "bytes_final" in r["kv"]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["benchmark"]["name"] == "humaneval" and info["sandbox"]
