"""A benchmark is data plus small functions: problems, prompt, stop strings, post-processing, check.

``kind = "generate"`` benchmarks generate completions and judge each with :meth:`Benchmark.check`
(execution in the sandbox, or exact match); ``kind = "perplexity"`` benchmarks give teacher-forced
targets instead (see ``code_ppl``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from anchorcoder.registry import ConfigError

CODE_BLOCK = re.compile(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)(?:```|$)", re.DOTALL)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROMPT_STYLES = ("completion", "chat")


@dataclass
class Problem:
    task_id: str
    prompt: str  # the text a completion model continues
    data: dict = field(default_factory=dict)  # everything else the benchmark keeps (tests, entry point)


@dataclass
class Verdict:
    passed: bool
    reason: str  # "passed", "failed: AssertionError", "timed out", "wrong value: 12" ...
    duration_s: float = 0.0


@dataclass
class Benchmark:
    name: ClassVar[str] = "base"
    kind: ClassVar[str] = "generate"
    limit: int | None = None  # first N problems; None = all
    stop: tuple[str, ...] = ()  # stop strings for completion prompts
    chat_instruction: str = "Complete the following Python code:\n"
    prompt_style: str | None = None  # force a style for this benchmark; None = the model's

    def __post_init__(self):
        self.stop = tuple(self.stop)
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"benchmark.limit must be a positive integer or null (all problems); got {self.limit}")
        if self.prompt_style is not None and self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"benchmark.prompt_style must be null or one of {', '.join(PROMPT_STYLES)}")

    def load_problems(self, tokenizer) -> list[Problem]:
        raise NotImplementedError

    def problems(self, tokenizer=None) -> list[Problem]:
        problems = self.load_problems(tokenizer)
        return problems if self.limit is None else problems[: self.limit]

    def chat_message(self, problem: Problem) -> str:
        return f"{self.chat_instruction}```python\n{problem.prompt}```"

    def render_prompt(self, problem: Problem, style: str, tokenizer) -> str:
        """Prompt text for ``completion`` (raw) or ``chat`` (the tokenizer's chat template) models."""
        if style == "completion":
            return problem.prompt
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("model.prompt_style=chat needs a tokenizer with a chat template; use completion")
        messages = [{"role": "user", "content": self.chat_message(problem)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def stop_strings(self, style: str) -> tuple[str, ...]:
        return self.stop if style == "completion" else ()  # chat answers end at EOS

    def postprocess(self, problem: Problem, text: str, style: str) -> str:
        """The code to keep from a generation: completions as they are, chat answers' code block."""
        if style == "chat":
            match = CODE_BLOCK.search(text)
            return match.group(1) if match else text
        return text

    def check(self, problems: list[Problem], completions: list[str], style: str, execution, on_result=None):
        """One :class:`Verdict` per (problem, completion) pair; ``execution`` = :class:`ExecutionSettings`."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What must be logged next to every number: data variant, prompt format, stop strings."""
        return {"name": self.name, "stop": list(self.stop)}


@dataclass
class ExecutionSettings:
    """How programs run in the sandbox: the ``execution`` config block (the time limit is the benchmark's)."""

    workers: int = 2
    memory_mb: int = 2048
    max_file_mb: int = 16
    max_processes: int = 1

    def __post_init__(self):
        from anchorcoder.execution.sandbox import check_workers

        check_workers(self.workers)  # the sandbox's own checks, before any model loads
        self.limits(timeout_s=1.0)

    def limits(self, timeout_s: float):
        from anchorcoder.execution import SandboxLimits

        return SandboxLimits(
            timeout_s=timeout_s,
            memory_mb=self.memory_mb,
            max_file_mb=self.max_file_mb,
            max_processes=self.max_processes,
        )


@dataclass
class ExecutionBenchmark(Benchmark):
    """Judged by running ``program(problem, completion)`` in the sandbox: passes if it runs to the end."""

    timeout_s: float = 3.0  # per program

    def program(self, problem: Problem, completion: str, style: str) -> str:
        raise NotImplementedError

    def check(self, problems, completions, style, execution: ExecutionSettings, on_result: Callable | None = None):
        from anchorcoder.execution import run_programs

        limits = execution.limits(self.timeout_s)
        programs = [self.program(p, c, style) for p, c in zip(problems, completions, strict=True)]
        results = run_programs(programs, limits, workers=execution.workers, on_result=on_result)
        return [Verdict(r.passed, r.reason, r.duration_s) for r in results]

    def describe(self) -> dict:
        return {**super().describe(), "timeout_s": self.timeout_s}


def resolve_path(path: str | None) -> Path | None:
    """A configured path, relative ones taken from the project root; None if unset."""
    if not path:
        return None
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else PROJECT_ROOT / resolved


def data_file(path: str | None, key: str, how_to_get: str) -> Path | None:
    """Resolve a configured data file that must exist; None if unset."""
    resolved = resolve_path(path)
    if resolved is not None and not resolved.is_file():
        raise ConfigError(f"{key}: no file at {resolved}. {how_to_get}")
    return resolved


def verify_sha256(path: Path, expected: str | None, key: str) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected and digest != expected:
        raise ConfigError(
            f"{path} has sha256 {digest}, expected {expected} ({key}); wrong file or version, "
            f"or set {key}=null to accept it"
        )
    return digest


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
