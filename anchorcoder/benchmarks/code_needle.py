"""Code needle: retrieve a constant defined far back in a long, generated Python module.

A seeded generator writes a module of many small functions, classes and integer constants (the
haystack) until it reaches ``context_tokens`` tokens of the model's tokenizer. One constant, the
needle, is placed at a chosen depth; the module ends with a test that compares that constant with
a literal, and the model must write the literal. Every other constant also holds a 5-digit number,
so copying "some number" does not score: the name must be looked up. Judged by exact match of the
first integer in the completion.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from anchorcoder.benchmarks.base import Benchmark, Problem, Verdict
from anchorcoder.registry import BENCHMARKS, ConfigError

NOUNS = (
    "account batch buffer cache channel checkpoint client cluster config cursor device event frame gateway "
    "handler index invoice job ledger lease manifest message metric node order packet page payload pipeline "
    "policy profile queue quota record region replica report request route sample schema segment session "
    "shard signal snapshot socket stream task tenant ticket token upload vector window worker"
).split()
VERBS = "build check compute encode fetch filter format merge normalize parse render resolve score split update".split()
QUALITIES = "max min default retry timeout limit offset port budget interval threshold capacity version".split()
INTEGER = re.compile(r"-?\d+")


def _name(rng: random.Random, parts: int) -> str:
    return "_".join(rng.sample(NOUNS, parts))


def _constant(rng: random.Random, used: set[str]) -> tuple[str, str, int]:
    while True:
        name = f"{_name(rng, 3)}_{rng.choice(QUALITIES)}".upper()
        if name not in used:
            used.add(name)
            value = rng.randint(10_000, 99_999)
            return name, f"{name} = {value}\n", value


def _function(rng: random.Random) -> str:
    a, b = rng.sample(("items", "count", "size", "offset", "scale", "limit", "step"), 2)
    noun = _name(rng, 2)
    k1, k2, k3 = rng.randint(2, 9), rng.randint(10, 99), rng.randint(1, 50)
    return (
        f"def {rng.choice(VERBS)}_{noun}({a}, {b}):\n"
        f'    """Return the {noun.replace("_", " ")} figure for {a} and {b}."""\n'
        f"    total = {a} * {k1} + {b}\n"
        f"    if total > {k2}:\n"
        f"        return total - {k3}\n"
        f"    return total\n"
    )


def _class(rng: random.Random) -> str:
    noun = _name(rng, 2)
    cls = "".join(w.title() for w in noun.split("_"))
    field = rng.choice(NOUNS)
    return (
        f"class {cls}:\n"
        f"    def __init__(self, {field}):\n"
        f"        self.{field} = {field}\n"
        f"        self.history = []\n\n"
        f"    def {rng.choice(VERBS)}(self, value):\n"
        f"        self.history.append(value)\n"
        f"        return len(self.history) + self.{field}\n"
    )


def haystack_module(rng: random.Random, tokenizer, context_tokens: int, depth: float) -> tuple[str, str, int]:
    """(module text ending where the answer goes, needle name, needle value)."""
    used: set[str] = set()
    needle_name, needle_line, needle_value = _constant(rng, used)
    header = '"""Service helpers."""\n\nimport math\n\n'
    tail = f"\n\n# Pinned values, copied from the definitions above\n{needle_name} ="
    budget = context_tokens - len(tokenizer(header + needle_line + tail, add_special_tokens=False).input_ids)
    blocks, size = [], 0
    while size < budget:
        kind = rng.random()
        block = _constant(rng, used)[1] if kind < 0.1 else _function(rng) if kind < 0.6 else _class(rng)
        blocks.append(block)
        size += len(tokenizer("\n" + block, add_special_tokens=False).input_ids)
    blocks.insert(round(depth * len(blocks)), needle_line)
    return header + "\n".join(blocks) + tail, needle_name, needle_value


@BENCHMARKS.register("code_needle")
@dataclass
class CodeNeedle(Benchmark):
    needs_tokenizer: ClassVar[bool] = True
    name = "code_needle"
    context_tokens: int = 2048
    n_problems: int = 20
    depths: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)
    seed: int = 1234
    prompt_style: str | None = "completion"

    def __post_init__(self):
        super().__post_init__()
        self.depths = tuple(self.depths)
        if not 128 <= self.context_tokens <= 131_072:
            raise ConfigError(f"benchmark.context_tokens must be in [128, 131072]; got {self.context_tokens}")
        if self.n_problems < 1:
            raise ConfigError(f"benchmark.n_problems must be >= 1; got {self.n_problems}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ConfigError(f"benchmark.depths must be fractions in [0, 1]; got {list(self.depths)}")

    def load_problems(self, tokenizer) -> list[Problem]:
        if tokenizer is None:
            raise ConfigError("code_needle sizes its modules with the model's tokenizer")
        problems = []
        for i in range(self.n_problems):
            depth = self.depths[i % len(self.depths)]
            rng = random.Random(f"{self.seed}/{self.context_tokens}/{i}")
            text, name, value = haystack_module(rng, tokenizer, self.context_tokens, depth)
            data = {"needle": name, "value": value, "depth": depth}
            problems.append(Problem(task_id=f"needle/{self.context_tokens}/{i}", prompt=text, data=data))
        return problems

    def check(self, problems, completions, style, execution=None, on_result=None):
        verdicts = []
        for i, (problem, completion) in enumerate(zip(problems, completions, strict=True)):
            found = INTEGER.match(completion.strip())
            got = int(found.group()) if found else None
            ok = got == problem.data["value"]
            verdicts.append(Verdict(ok, "passed" if ok else f"wrong value: {completion.strip()[:40]!r}"))
            if on_result is not None:
                on_result(i, verdicts[-1])
        return verdicts

    def describe(self) -> dict:
        return {
            "name": self.name,
            "context_tokens": self.context_tokens,
            "depths": list(self.depths),
            "seed": self.seed,
            "scoring": "exact match of the first integer",
        }
