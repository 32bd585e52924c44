"""Benchmarks; importing this package registers them all."""

from anchorcoder.benchmarks import humaneval  # noqa: F401
from anchorcoder.benchmarks.base import Benchmark, Problem  # noqa: F401
from anchorcoder.registry import BENCHMARKS


def build_benchmark(cfg: dict) -> Benchmark:
    return BENCHMARKS.build(cfg)
