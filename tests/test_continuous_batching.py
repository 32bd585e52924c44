"""Continuous batching: a finished row's slot takes the next row at once, its prompt prefilled on its own
and its cache joined to the running rows'. Every row's tokens, likelihoods and KV records must be what
it gets decoded alone."""

from __future__ import annotations

import pytest
import torch

from anchorcoder.generation import GenerationEngine, GenerationSettings, KVCache
from anchorcoder.methods import build_method

LENGTHS = (70, 23, 51, 9, 40, 64, 31)  # prompt tokens: rows of a batch start at different widths
TARGETS = (3, 16, 7, 12, 1, 9, 5)  # teacher-forced lengths: rows finish at different steps

METHODS = [  # eviction: once per prefill, so per row exact in a batch (every_step is not: see the last test)
    {"name": "dense"},
    {"name": "l2norm", "compression_ratio": 0.5, "skip_layers": [1]},  # layers of different lengths
    {"name": "streamingllm", "compression_ratio": 0.5, "prefill_cap": True},
    {"name": "anllm", "variant": "ac"},
    {"name": "anchorcoder", "mhpe": True},
]


def prompts_and_targets(tokenizer, humaneval_prompts):
    prompts = [tokenizer(humaneval_prompts[i]).input_ids[:n] for i, n in enumerate(LENGTHS)]
    targets = [tokenizer(humaneval_prompts[i + 7]).input_ids[:n] for i, n in enumerate(TARGETS)]
    return prompts, targets


@pytest.mark.parametrize("method_cfg", METHODS, ids=lambda c: c["name"])
def test_every_row_gets_what_it_gets_alone(tiny, humaneval_prompts, method_cfg):
    method = build_method(method_cfg)
    method.prepare(tiny.model, tiny.tokenizer)
    prompts, targets = prompts_and_targets(tiny.tokenizer, humaneval_prompts)

    def run(batch_size, continuous=True, chunk=None):
        settings = GenerationSettings(
            max_new_tokens=12, batch_size=batch_size, continuous_batching=continuous, prefill_chunk=chunk,
            stop=("e",),  # greedy rows stop at their first "e": different lengths
        )  # fmt: skip
        engine = GenerationEngine(tiny.model, tiny.tokenizer, method, settings)
        return engine.generate(prompts), engine.generate(prompts, targets=targets), engine.stats

    # a prefill cap evicts at chunk boundaries, which left padding moves within each row: not per row exact
    for chunk in (None,) if method_cfg.get("prefill_cap") else (None, 16):
        alone, alone_tf, _ = run(1, chunk=chunk)
        for continuous in (True, False):
            batched, batched_tf, stats = run(3, continuous, chunk)
            assert [r.token_ids for r in batched] == [r.token_ids for r in alone], (chunk, continuous)
            assert [r.finish_reason for r in batched] == [r.finish_reason for r in alone]
            for a, b in zip(batched_tf, alone_tf, strict=True):
                assert a.token_ids == b.token_ids and abs(a.nll - b.nll) < 1e-4
                assert a.kv.entries_final == b.kv.entries_final
                if chunk is None:  # chunks, shifted by the padding, change what a row's prefill holds at once
                    assert a.kv.entries_peak == b.kv.entries_peak
                assert a.kv.dense_entries_final == b.kv.dense_entries_final
            if continuous:  # rows joined as slots freed: more prefills than batches
                assert len(stats.prefill_s) > 2 * -(-len(prompts) // 3)


def test_slots_refill_as_rows_finish(tiny, humaneval_prompts):
    """With teacher forcing of lengths 3, 16, 7, ... the slots of the short rows take the next rows."""
    method = build_method({"name": "dense"})
    prompts, targets = prompts_and_targets(tiny.tokenizer, humaneval_prompts)
    seen = []

    def run(continuous):
        settings = GenerationSettings(max_new_tokens=16, batch_size=3, continuous_batching=continuous)
        engine = GenerationEngine(tiny.model, tiny.tokenizer, method, settings)
        results = engine.generate(prompts, targets=targets, on_result=lambda r: seen.append(r.prompt_index))
        return results, engine.stats

    static, static_stats = run(False)
    assert seen == [0, 2, 1, 4, 5, 3, 6] and len(static_stats.prefill_s) == 3  # batch by batch
    seen.clear()
    results, stats = run(True)
    # finishing steps: 0 at 3 -> row 3 joins (ends at 4 + 12 - 1 = 15); 2 at 7 -> row 4 (ends at 8) -> row 5
    # (ends at 9 + 9 - 1 = 17); 3 at 15 -> row 6 (ends at 16 + 5 - 1 = 20); 1 at 16
    assert seen == [0, 2, 4, 3, 1, 5, 6]
    assert [r.prompt_index for r in results] == list(range(7))  # returned in the order asked
    assert len(stats.prefill_s) == 5  # rows 0-2 together, then 3, 4, 5, 6 one at a time
    # decode forwards: the longest row (16 tokens) bounds the batch's steps; fewer steps than batch by batch
    assert stats.decode_tokens == static_stats.decode_tokens  # the same tokens fed
    assert stats.decode_tokens + stats.prefill_tokens == static_stats.decode_tokens + static_stats.prefill_tokens


def test_append_rows_pads_and_keeps_layers_sharing_positions():
    def filled(lengths, seed):
        torch.manual_seed(seed)
        cache = KVCache(2, 2, 4)
        width = max(lengths)
        positions = torch.stack([torch.cat([torch.full((width - n,), -1), torch.arange(n)]) for n in lengths])
        cache.begin_step(positions)
        for layer in range(2):
            cache.update(torch.randn(len(lengths), 2, width, 4), torch.randn(len(lengths), 2, width, 4), layer)
        cache.observe()
        cache.method_state["per_row"] = torch.tensor(lengths)
        cache.method_state["per_entry"] = positions * 10
        return cache

    a, b = filled([5, 3], 0), filled([2], 1)
    a_keys, b_keys = a.keys[1].clone(), b.keys[1].clone()
    a.append_rows(b, entry_state=("per_entry",))
    assert a.positions[0] is a.positions[1]  # still one positions tensor for both layers
    assert a.positions[0].tolist() == [[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2], [-1, -1, -1, 0, 1]]
    assert torch.equal(a.keys[1][:2], a_keys) and torch.equal(a.keys[1][2, :, 3:], b_keys[0])
    assert a.entries_per_row().tolist() == [5 * 4, 3 * 4, 2 * 4]  # 2 layers x 2 heads
    assert a.method_state["per_row"].tolist() == [5, 3, 2]
    assert a.method_state["per_entry"][2].tolist() == [-1, -1, -1, 0, 10]
    a.select_rows(torch.tensor([1, 2]))  # the longest row leaves: two leading columns are padding for all
    a.drop_leading_padding(entry_state=("per_entry",))
    assert a.positions[0] is a.positions[1]
    assert a.positions[0].tolist() == [[0, 1, 2], [-1, 0, 1]]
    assert a.keys[0].shape[2] == 3 and a.method_state["per_entry"].tolist() == [[0, 10, 20], [-1, 0, 10]]
    assert torch.equal(a.keys[1][1, :, 1:], b_keys[0]) and a.entries_per_row().tolist() == [3 * 4, 2 * 4]


def test_eviction_every_step_joins_rows_with_per_head_entries(tiny, humaneval_prompts):
    """l2norm every step keeps different entries per KV head ([B, H, S] positions) while newcomers arrive
    with shared ones. In a batch a row may hold a little more than its budget where it lacks padding to
    fill the rectangle (documented): records say so, and the likelihoods stay those of the row alone."""
    method = build_method({"name": "l2norm", "compression_ratio": 0.5, "schedule": "every_step", "skip_layers": []})
    prompts, targets = prompts_and_targets(tiny.tokenizer, humaneval_prompts)

    def run(batch_size):
        settings = GenerationSettings(max_new_tokens=16, batch_size=batch_size)
        return GenerationEngine(tiny.model, tiny.tokenizer, method, settings).generate(prompts, targets=targets)

    alone, batched = run(1), run(3)
    per_token = 2 * 2  # layers x KV heads of the tiny model
    for a, b in zip(batched, alone, strict=True):
        assert b.kv.entries_final <= a.kv.entries_final <= b.kv.entries_final + 2 * per_token
        assert a.kv.entries_final < a.kv.dense_entries_final
        assert abs(a.nll - b.nll) < 0.2
