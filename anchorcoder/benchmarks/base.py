"""A benchmark is data plus four small functions: problems, prompt, stop strings, post-processing.

Scoring by execution joins in the benchmarks issue; here a benchmark yields prompts and cleans
completions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from anchorcoder.registry import ConfigError

CODE_BLOCK = re.compile(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)(?:```|$)", re.DOTALL)


@dataclass
class Problem:
    task_id: str
    prompt: str  # the text a completion model continues
    data: dict = field(default_factory=dict)  # everything else the benchmark keeps (tests, entry point)


@dataclass
class Benchmark:
    name: ClassVar[str] = "base"
    limit: int | None = None  # first N problems; None = all
    stop: tuple[str, ...] = ()  # stop strings for completion prompts
    chat_instruction: str = "Complete the following Python code:\n"

    def __post_init__(self):
        self.stop = tuple(self.stop)
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"benchmark.limit must be a positive integer or null (all problems); got {self.limit}")

    def load_problems(self) -> list[Problem]:
        raise NotImplementedError

    def problems(self) -> list[Problem]:
        problems = self.load_problems()
        return problems if self.limit is None else problems[: self.limit]

    def render_prompt(self, problem: Problem, style: str, tokenizer) -> str:
        """Prompt text for ``completion`` (raw) or ``chat`` (the tokenizer's chat template) models."""
        if style == "completion":
            return problem.prompt
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("model.prompt_style=chat needs a tokenizer with a chat template; use completion")
        messages = [{"role": "user", "content": f"{self.chat_instruction}```python\n{problem.prompt}```"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def stop_strings(self, style: str) -> tuple[str, ...]:
        return self.stop if style == "completion" else ()  # chat answers end at EOS

    def postprocess(self, problem: Problem, text: str, style: str) -> str:
        """The code to keep from a generation: completions as they are, chat answers' code block."""
        if style == "chat":
            match = CODE_BLOCK.search(text)
            return match.group(1) if match else text
        return text
