"""``data=self_distill``: a chat-format corpus the dense model writes for itself.

Prompts are MBPP train-split tasks (ids 601-974; never the test split) and standard-library
functions (signature + docstring, "complete this"), rendered exactly as the benchmarks render
their chat prompts. The dense model answers them through our engine, under its chat template; an
answer is kept only if it holds a code block that parses. Training rows are then prompt + answer,
with labels on the answer only, so training sees the chat behaviour that evaluation uses.

The answers are cached in ``data.cache_dir/<hash>.jsonl``, where the hash covers the model config,
the prompts and the generation settings: a corpus is generated once, appended answer by answer (an
interrupted run resumes where it stopped), and marked complete by ``<hash>.done.json``. Answers that
contain a benchmark problem (the contamination guard) are dropped there and logged.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import random
import textwrap
import time
from pathlib import Path

from anchorcoder.registry import ConfigError

log = logging.getLogger(__name__)

PROMPT_SOURCES = ("mbpp_train", "stdlib_functions")


def self_distill_documents(cfg: dict, model, tokenizer, device, model_cfg: dict, sharded: bool = False):
    """Documents (prompt = chat prompt, text = the dense model's answer) of a ``self_distill`` config."""
    from anchorcoder.training.data import Document, benchmark_needles, find_contamination

    prompts = distill_prompts(cfg, tokenizer)
    settings = _generation(cfg)
    key = {"model": model_cfg, "prompts": [p for _, p in prompts], "generation": settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = Path(cfg["cache_dir"]).expanduser()
    answers_file, done_file = folder / f"{digest}.jsonl", folder / f"{digest}.done.json"
    if not done_file.exists():
        if sharded:
            raise ConfigError(
                f"data=self_distill: the corpus {answers_file} is not generated yet, and a ZeRO-3 model is sharded; "
                "generate it first with the same model and data options and deepspeed=none (e.g. trainer.max_steps=1)"
            )
        if int(os.environ.get("RANK", 0)) == 0:
            _generate(prompts, answers_file, done_file, settings, model, tokenizer, device)
        else:  # other processes wait for rank 0's corpus
            while not done_file.exists():
                time.sleep(5)
    else:
        log.info("self_distill: reusing %s (%s)", answers_file, json.loads(done_file.read_text()))
    rows = [json.loads(line) for line in answers_file.read_text().splitlines() if line.strip()]
    docs = [Document(r["name"], r["answer"], prompt=r["prompt"]) for r in rows if r["kept"]]
    hits = {name for _, name in find_contamination(docs, benchmark_needles(cfg))}
    if hits:
        log.warning("self_distill: dropped %d answer(s) holding a benchmark problem: %s", len(hits), sorted(hits))
        docs = [d for d in docs if d.name not in hits]
    if not docs:
        raise ConfigError(f"data=self_distill: none of the {len(rows)} answers holds a code block that parses")
    log.info("self_distill: %d of %d answers kept (%s)", len(docs), len(rows), answers_file)
    return docs


def check_config(cfg: dict) -> None:
    """The ``self_distill`` options that can be checked before any model loads."""
    _sources(cfg)
    _generation(cfg)


def _sources(cfg: dict) -> list[str]:
    sources = list(cfg.get("prompt_sources") or ())
    if not sources or any(s not in PROMPT_SOURCES for s in sources):
        raise ConfigError(f"data.prompt_sources must be a non-empty list of {', '.join(PROMPT_SOURCES)}; got {sources}")
    return sources


def _generation(cfg: dict) -> dict:
    from anchorcoder.generation import GenerationSettings

    g = dict(cfg.get("generation") or {})
    try:
        GenerationSettings(**g)  # validates the values, naming them
    except TypeError as err:
        raise ConfigError(f"data.generation: {err}") from None
    return g


def distill_prompts(cfg: dict, tokenizer) -> list[tuple[str, str]]:
    """(name, chat prompt text) pairs: the configured sources, shuffled with ``data.seed``, capped at
    ``data.max_prompts``."""
    from anchorcoder.benchmarks.base import Problem
    from anchorcoder.benchmarks.humaneval import HumanEval
    from anchorcoder.benchmarks.mbpp import MBPP

    sources = _sources(cfg)
    problems = []
    if "mbpp_train" in sources:
        from anchorcoder.training.data import MBPP_TRAIN_IDS, _mbpp_rows

        rows = _mbpp_rows(cfg)
        problems += [(MBPP(), Problem(f"MBPP/{i}", "", rows[i])) for i in MBPP_TRAIN_IDS]
    if "stdlib_functions" in sources:
        problems += [(HumanEval(), Problem(name, prompt)) for name, prompt in stdlib_function_prompts(cfg)]
    random.Random(int(cfg.get("seed", 0))).shuffle(problems)
    limit = cfg.get("max_prompts")
    problems = problems[: int(limit)] if limit else problems
    return [(p.task_id, bench.render_prompt(p, "chat", tokenizer)) for bench, p in problems]


def stdlib_function_prompts(cfg: dict) -> list[tuple[str, str]]:
    """Module-level functions of the standard library with a docstring: (``file:function``, the
    signature and docstring, dedented), as HumanEval states its problems."""
    from anchorcoder.training.data import stdlib_documents

    low = int(cfg.get("min_docstring_chars", 40))
    max_lines = int(cfg.get("max_body_lines", 40))
    found = []
    for doc in stdlib_documents({**cfg, "max_documents": None}):
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        lines = doc.text.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.decorator_list or node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node)
            if not docstring or len(docstring) < low or len(node.body) < 2:
                continue
            body_lines = node.end_lineno - node.body[0].end_lineno
            if not 2 <= body_lines <= max_lines:
                continue
            header = "\n".join(lines[node.lineno - 1 : node.body[0].end_lineno])
            found.append((f"stdlib/{doc.name}:{node.name}", textwrap.dedent(header) + "\n"))
    return found


def _generate(prompts, answers_file: Path, done_file: Path, settings: dict, model, tokenizer, device) -> None:
    """Answer every prompt not yet in ``answers_file`` with the dense model; then write ``done_file``."""
    from anchorcoder.benchmarks.base import CODE_BLOCK
    from anchorcoder.generation import GenerationEngine, GenerationSettings
    from anchorcoder.methods.dense import Dense

    answers_file.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if answers_file.exists():
        lines = answers_file.read_text().splitlines(keepends=True)
        whole = [line for line in lines if line.endswith("\n")]  # a line torn by an interrupt is dropped
        answers_file.write_text("".join(whole))
        done = {json.loads(line)["name"] for line in whole}
    todo = [(name, prompt) for name, prompt in prompts if name not in done]
    log.info("self_distill: %d prompts, %d answered before, generating %d into %s",
             len(prompts), len(done), len(todo), answers_file)  # fmt: skip
    if todo:
        was_training = model.training
        model.to(device).eval()
        engine = GenerationEngine(model, tokenizer, Dense(), GenerationSettings(**settings))
        ids = [tokenizer(p, add_special_tokens=False).input_ids for _, p in todo]
        from tqdm.auto import tqdm

        with open(answers_file, "a") as out, tqdm(total=len(todo), desc="self_distill answers", unit="prompt") as bar:

            def record(result):
                name, prompt = todo[result.prompt_index]
                match = CODE_BLOCK.search(result.text)
                kept = match is not None and _parses(match.group(1)) and result.finish_reason == "eos"
                row = {"name": name, "prompt": prompt, "answer": result.text, "kept": kept,
                       "finish_reason": result.finish_reason, "tokens": len(result.token_ids)}  # fmt: skip
                out.write(json.dumps(row) + "\n")
                out.flush()
                bar.update(1)

            engine.generate(ids, on_result=record)
        model.train(was_training)
    rows = [json.loads(line) for line in answers_file.read_text().splitlines()]
    summary = {"prompts": len(rows), "kept": sum(r["kept"] for r in rows), "settings": settings}
    done_file.write_text(json.dumps(summary, indent=2))


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return bool(code.strip())
