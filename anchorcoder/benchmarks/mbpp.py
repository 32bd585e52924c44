"""MBPP (Austin et al. 2021): the 500-task test split (task ids 11-510), 3-shot prompt from ids 2, 3, 4.

Completion prompts follow the paper's format (as lm-evaluation-harness does)::

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:

    {test 1}
    {test 2}
    {test 3}
    [BEGIN]
    {code}
    [DONE]

three solved examples, then the task with its ``[BEGIN]``; generation stops at ``[DONE]``.
A program is ``completion + test_setup_code + the three asserts`` (the setup code of tasks 367 and
927 builds trees with the ``Node`` class the solution defines, so it must come after it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from anchorcoder.benchmarks.base import ExecutionBenchmark, Problem, read_jsonl, resolve_path, verify_sha256
from anchorcoder.registry import BENCHMARKS, ConfigError

TEST_IDS = range(11, 511)
FEW_SHOT_IDS = (2, 3, 4)
log = logging.getLogger(__name__)


def task_header(row: dict) -> str:
    tests = "\n".join(row["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {row['text']} "
        f"Your code should pass these tests:\n\n{tests}\n"
    )


def clean_code(code: str) -> str:
    return code.replace("\r\n", "\n").strip("\n")


def load_mbpp_rows(
    path: str | None, sha256: str | None, hub_dataset: str, keys: tuple[str, str] = ("data_file", "sha256")
) -> dict[int, dict]:
    """All 974 MBPP rows by task id: from the local JSONL when it exists, else from the hub.
    ``keys``: the benchmark config keys of ``path`` and ``sha256``, for the messages."""
    key, sha_key = keys
    how = (
        f"Point benchmark.{key} at the MBPP release mbpp.jsonl (google-research/google-research, "
        "mbpp/mbpp.jsonl), or make benchmark.hub_dataset reachable (the hub, or its HF cache)."
    )
    local = resolve_path(path)
    if local is not None and local.is_file():
        verify_sha256(local, sha256, f"benchmark.{sha_key}")
        rows = read_jsonl(local, f"benchmark.{key}", ("task_id", "text", "code", "test_list"), id_field="task_id")
        return _by_task_id(rows)
    if local is not None:
        log.warning("no MBPP file at %s; loading %s from the hub", local, hub_dataset)
    try:
        import datasets

        rows = [dict(r) for split in datasets.load_dataset(hub_dataset, "full").values() for r in split]
    except Exception as err:  # offline, unknown name ...
        missing = f"no file at {local}, and " if local is not None else ""
        raise ConfigError(
            f"benchmark.{key}: {missing}could not load MBPP from the hub ({hub_dataset}): {err}. {how}"
        ) from err
    return _by_task_id(rows)


def _by_task_id(rows: list[dict]) -> dict[int, dict]:
    by_id = {int(r["task_id"]): r for r in rows}
    missing = [i for i in (*FEW_SHOT_IDS, *TEST_IDS) if i not in by_id]
    if missing:
        raise ConfigError(f"MBPP data lacks task ids {missing[:5]}...; it must be the full 974-task release")
    return by_id


@BENCHMARKS.register("mbpp")
@dataclass
class MBPP(ExecutionBenchmark):
    name = "mbpp"
    data_file: str | None = None
    sha256: str | None = None
    hub_dataset: str = "google-research-datasets/mbpp"

    def load_problems(self, tokenizer=None) -> list[Problem]:
        rows = load_mbpp_rows(self.data_file, self.sha256, self.hub_dataset)
        shots = "".join(
            f"{task_header(rows[i])}[BEGIN]\n{clean_code(rows[i]['code'])}\n[DONE]\n\n" for i in FEW_SHOT_IDS
        )
        return [
            Problem(task_id=f"MBPP/{i}", prompt=f"{shots}{task_header(rows[i])}[BEGIN]\n", data=rows[i])
            for i in TEST_IDS
        ]

    def chat_message(self, problem: Problem) -> str:
        return f"{task_header(problem.data)}{self.chat_instruction}"

    def solution(self, problem: Problem, completion: str, style: str) -> str:
        return completion

    def tests(self, problem: Problem) -> str:
        setup = (problem.data.get("test_setup_code") or "").replace("\r\n", "\n")
        return f"{setup}\n" + "\n".join(problem.data["test_list"]) + "\n"

    def describe(self) -> dict:
        return {
            **super().describe(),
            "data": str(self.data_file or self.hub_dataset),
            "split": "test (task ids 11-510)",
            "prompt": "completion: 3-shot [BEGIN]/[DONE], examples 2, 3, 4; chat: the task and its tests",
        }
