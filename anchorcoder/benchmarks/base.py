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

from anchorcoder.benchmarks.strict import strict_tests
from anchorcoder.registry import ConfigError

CODE_BLOCK = re.compile(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)(?:```|$)", re.DOTALL)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROMPT_STYLES = ("completion", "chat")


def chat_prompt(tokenizer, content: str) -> str:
    """``content`` as one user message under the tokenizer's chat template, the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("model.prompt_style=chat needs a tokenizer with a chat template; use completion")
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(method, tokenizer, text: str, style: str) -> list[int]:
    """A rendered prompt's ids as ``method`` feeds them; special tokens (BOS) only for raw completion
    prompts, since a chat template writes its own."""
    return method.encode(tokenizer, text, add_special_tokens=(style == "completion"))


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

    needs_tokenizer: ClassVar[bool] = False  # its problems are built with the model's tokenizer
    _loaded: list | None = field(default=None, init=False, repr=False, compare=False)

    def load_problems(self, tokenizer) -> list[Problem]:
        raise NotImplementedError

    def preload(self) -> None:
        """Load and check the data now, before any model loads (unless the problems need its tokenizer)."""
        if not self.needs_tokenizer:
            self._loaded = self.load_problems(None)

    def problems(self, tokenizer=None) -> list[Problem]:
        problems = self._loaded if self._loaded is not None else self.load_problems(tokenizer)
        return problems if self.limit is None else problems[: self.limit]

    def chat_message(self, problem: Problem) -> str:
        return f"{self.chat_instruction}```python\n{problem.prompt}```"

    def render_prompt(self, problem: Problem, style: str, tokenizer) -> str:
        """Prompt text for ``completion`` (raw) or ``chat`` (the tokenizer's chat template) models."""
        if style == "completion":
            return problem.prompt
        return chat_prompt(tokenizer, self.chat_message(problem))

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
    strict_equality: bool = False  # every == of the tests also compares types (benchmarks/strict.py)

    def __post_init__(self):
        from anchorcoder.execution.sandbox import check_workers

        check_workers(self.workers)  # the sandbox's own checks, before any model loads
        if not isinstance(self.strict_equality, bool):
            raise ConfigError(f"execution.strict_equality must be true or false; got {self.strict_equality!r}")
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

    def solution(self, problem: Problem, completion: str, style: str) -> str:
        """The code under test: the completion (with the prompt it continues, where it needs it)."""
        raise NotImplementedError

    def tests(self, problem: Problem) -> str:
        """The benchmark's test code, run after the solution."""
        raise NotImplementedError

    def program(self, problem: Problem, completion: str, style: str, strict_equality: bool = False) -> str:
        tests = self.tests(problem)
        return f"{self.solution(problem, completion, style)}\n\n{strict_tests(tests) if strict_equality else tests}"

    def check(self, problems, completions, style, execution: ExecutionSettings, on_result: Callable | None = None):
        from anchorcoder.execution import run_programs

        limits = execution.limits(self.timeout_s)
        strict = execution.strict_equality
        programs = [self.program(p, c, style, strict) for p, c in zip(problems, completions, strict=True)]
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


def read_jsonl(path: Path, key: str, required: tuple[str, ...] = (), id_field: str | None = None) -> list[dict]:
    """Every row of a JSON-lines file (``.gz`` too), each checked: an error names the config key, the file
    and the line (not UTF-8, not JSON, not an object, a required field missing, a repeated id)."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows, first_line = [], {}
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                where = f"{key}: {path} line {number}"
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise ConfigError(f"{where} is not UTF-8 text (byte {err.start}); wrong or corrupt file") from None
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{where} is not valid JSON ({err.msg}, column {err.colno})") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{where} is not a JSON object")
                missing = [k for k in required if k not in row]
                if missing:
                    raise ConfigError(f"{where} lacks {', '.join(missing)} (each row needs {', '.join(required)})")
                if id_field is not None:
                    task = row[id_field]
                    if not isinstance(task, str | int):
                        raise ConfigError(f"{where}: {id_field} must be a string or an integer; got {task!r}")
                    if task in first_line:
                        raise ConfigError(f"{where}: {id_field} {task!r} again (first at line {first_line[task]})")
                    first_line[task] = number
                rows.append(row)
    except (OSError, EOFError) as err:  # unreadable, or a corrupt or truncated .gz
        raise ConfigError(f"{key}: {path} cannot be read ({err})") from None
    if not rows:
        raise ConfigError(f"{key}: {path} holds no rows")
    return rows
