"""Code perplexity: teacher-forced likelihood of reference solutions given their prompt.

Every target token is fed through the engine's real cache and the method's pruning, step by step,
so the model sees exactly what it would see while generating. Moves even when pass@1 is near zero.
Sources: HumanEval canonical solutions after their prompt; MBPP reference code (test split) after
a zero-shot docstring prompt with the task text and its first assert.
"""

from __future__ import annotations

from dataclasses import dataclass

from anchorcoder.benchmarks.base import Benchmark, Problem
from anchorcoder.benchmarks.humaneval import humaneval_rows
from anchorcoder.benchmarks.mbpp import TEST_IDS, clean_code, load_mbpp_rows
from anchorcoder.registry import BENCHMARKS, ConfigError

SOURCES = ("humaneval", "mbpp")


@BENCHMARKS.register("code_ppl")
@dataclass
class CodePerplexity(Benchmark):
    name = "code_ppl"
    kind = "perplexity"
    sources: tuple[str, ...] = SOURCES
    mbpp_data_file: str | None = None
    mbpp_sha256: str | None = None
    hub_dataset: str = "google-research-datasets/mbpp"
    prompt_style: str | None = "completion"

    def __post_init__(self):
        super().__post_init__()
        self.sources = tuple(self.sources)
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources:
            raise ConfigError(f"benchmark.sources must be a non-empty subset of {list(SOURCES)}; got {self.sources}")

    def problems(self, tokenizer=None) -> list[Problem]:
        # benchmark.limit applies to each source
        return self._loaded if self._loaded is not None else self.load_problems(tokenizer)

    def load_problems(self, tokenizer=None) -> list[Problem]:
        problems = []
        if "humaneval" in self.sources:
            rows = list(humaneval_rows().values())[: self.limit]
            problems += [
                Problem(row["task_id"], row["prompt"], {"target": row["canonical_solution"], "source": "humaneval"})
                for row in rows
            ]
        if "mbpp" in self.sources:
            by_id = load_mbpp_rows(
                self.mbpp_data_file, self.mbpp_sha256, self.hub_dataset, keys=("mbpp_data_file", "mbpp_sha256")
            )
            for i in list(TEST_IDS)[: self.limit]:
                row = by_id[i]
                prompt = f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n'
                problems.append(
                    Problem(f"MBPP/{i}", prompt, {"target": clean_code(row["code"]) + "\n", "source": "mbpp"})
                )
        return problems

    def describe(self) -> dict:
        return {"name": self.name, "sources": list(self.sources), "per_source_limit": self.limit}
