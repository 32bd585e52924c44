"""Benchmarks; importing this package registers them all."""

from anchorcoder.benchmarks import code_needle, code_ppl, humaneval, mbpp  # noqa: F401
from anchorcoder.benchmarks.base import Benchmark, ExecutionSettings, Problem, Verdict  # noqa: F401
from anchorcoder.registry import BENCHMARKS


def build_benchmark(cfg: dict) -> Benchmark:
    return BENCHMARKS.build(cfg)
