"""Chunked prefill (``generation.prefill_chunk``): the prompt fed in chunks, the method pruning after each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anchorcoder.generation import GenerationEngine, GenerationSettings, attention
from anchorcoder.generation.attention import repeat_kv_heads
from anchorcoder.generation.engine import incremental_logits
from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import masked_forward
from anchorcoder.methods.eviction import kept_count
from anchorcoder.registry import ConfigError
from tests.test_anchorcoder import anchorcoder, gated, line_ids
from tests.test_anllm import anllm, with_anchors

PROMPT, NEW = 80, 8
CHUNK_SIZES = [1, 7, 64, None]  # None: the whole prompt in one forward


def schedule(chunk: int | None, prompt: int = PROMPT, new: int = NEW) -> list[int]:
    """The prompt in chunks of ``chunk`` tokens, then one token at a time."""
    chunk = chunk or prompt
    return [min(chunk, prompt - start) for start in range(0, prompt, chunk)] + [1] * new


def test_dense_chunked_prefill_gives_the_one_shot_logits(tiny, humaneval_prompts):
    ids = torch.tensor([tiny.tokenizer("".join(humaneval_prompts[2:5])).input_ids[: PROMPT + NEW]])
    dense = build_method({"name": "dense"})
    reference = incremental_logits(tiny.model, dense, ids, schedule(None))
    for chunk in CHUNK_SIZES[:-1]:
        chunked = incremental_logits(tiny.model, dense, ids, schedule(chunk), prompt=PROMPT)
        assert (chunked - reference).abs().max().item() < 1e-5


ANCHOR_VARIANTS = {
    "anllm AC": ("anllm", {"variant": "ac"}),
    "anllm EP": ("anllm", {"variant": "ep"}),
    "TAA+LAA+MHPE": ("anchorcoder", {"mhpe": True}),
    "gated LAA, gates open": ("gated", {"anchors_see_anchors": True}),
    "prompt kept whole": ("anchorcoder", {"compress_prompt": False}),
}


def anchor_method(loaded, variant: str):
    name, options = ANCHOR_VARIANTS[variant]
    if name == "anllm":
        method, model, tokenizer = anllm(options["variant"], loaded)
        random = torch.randint(100, 1000, (2, PROMPT + NEW), generator=torch.Generator().manual_seed(3))
        return method, model, tokenizer, with_anchors(method, random, 0.1, 4)
    method, model, tokenizer = (gated if name == "gated" else anchorcoder)(loaded, **options)
    return method, model, tokenizer, line_ids(method, PROMPT + NEW, 3)


@pytest.mark.parametrize("chunk", CHUNK_SIZES, ids=lambda c: f"chunk {c or 'whole'}")
@pytest.mark.parametrize("variant", list(ANCHOR_VARIANTS))
def test_anchor_methods_chunked_prefill_equals_the_masked_forward(tiny, variant, chunk):
    method, model, _, ids = anchor_method(tiny, variant)
    with torch.inference_mode():
        reference = masked_forward(model, method, ids, prompt_lengths=[PROMPT] * ids.shape[0]).logits
    ours = incremental_logits(model, method, ids, schedule(chunk), prompt=PROMPT)
    assert (ours - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "method_cfg",
    [
        {"name": "dense"},
        {"name": "l2norm", "compression_ratio": 0.5, "skip_layers": [0]},
        {"name": "streamingllm", "compression_ratio": 0.5},
        {"name": "anchorcoder", "mhpe": True},
    ],
    ids=lambda c: c["name"],
)
def test_left_padded_batch_chunked_gives_the_one_shot_results(tiny, humaneval_prompts, method_cfg):
    """Greedy tokens, teacher-forced likelihoods and final KV held are those of one-shot prefill (eviction
    without the prefill cap evicts once, after the whole prompt, as before)."""
    method = build_method(method_cfg)
    method.prepare(tiny.model, tiny.tokenizer)
    prompts = [tiny.tokenizer(p).input_ids[:n] for p, n in zip(humaneval_prompts[:3], (70, 23, 51), strict=True)]
    targets = [tiny.tokenizer(p).input_ids[90:106] for p in humaneval_prompts[3:6]]

    def run(chunk, **kw):
        settings = GenerationSettings(max_new_tokens=16, batch_size=3, stop_at_eos=False, prefill_chunk=chunk)
        return GenerationEngine(tiny.model, tiny.tokenizer, method, settings).generate(prompts, **kw)

    one_shot, one_shot_tf = run(None), run(None, targets=targets)
    for chunk in (7, 32):
        chunked, chunked_tf = run(chunk), run(chunk, targets=targets)
        assert [r.token_ids for r in chunked] == [r.token_ids for r in one_shot]
        assert [r.kv.entries_final for r in chunked] == [r.kv.entries_final for r in one_shot]
        for a, b in zip(chunked_tf, one_shot_tf, strict=True):
            assert abs(a.nll - b.nll) < 1e-4


@pytest.mark.parametrize("name", ["l2norm", "streamingllm"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_prefill_cap_holds_budget_plus_one_chunk_in_every_layer(tiny, humaneval_prompts, name, chunk):
    method = build_method({"name": name, "compression_ratio": 0.5, "prefill_cap": True, "skip_layers": []})
    held = []  # (tokens seen before the step, tokens fed, per-layer real entries before and after pruning)

    class Probe(type(method)):
        def after_step(self, cache, step):
            before = [int((cache.positions[layer] >= 0).sum(-1).max()) for layer in range(cache.num_layers)]
            super().after_step(cache, step)
            after = [int((cache.positions[layer] >= 0).sum(-1).max()) for layer in range(cache.num_layers)]
            seen = int(step.positions.max()) + 1
            held.append((seen - step.positions.shape[1], step.positions.shape[1], before, after))

    probe = Probe(**{k: getattr(method, k) for k in method.describe() if k != "name"})
    prompt = tiny.tokenizer(humaneval_prompts[4]).input_ids[:150]
    settings = GenerationSettings(max_new_tokens=1, stop_at_eos=False, prefill_chunk=chunk)
    result = GenerationEngine(tiny.model, tiny.tokenizer, probe, settings).generate([prompt])[0]

    def cap(seen: int) -> int:  # the budget, or the protected sinks where they are more
        return max(int(kept_count(torch.tensor([seen]), 0.5, "ceil")), min(method.protect_sink, seen))

    assert len(held) == -(-len(prompt) // chunk)  # one step per prompt chunk (max_new_tokens=1: no decode step)
    for seen_before, fed, before, after in held:
        assert all(n <= cap(seen_before) + fed for n in before)  # what was kept + this chunk
        assert all(n <= cap(seen_before + fed) for n in after)
    layers, kv_heads = tiny.model.config.num_hidden_layers, tiny.model.config.num_key_value_heads
    assert result.kv.entries_peak <= (cap(len(prompt)) + chunk) * layers * kv_heads


def test_peak_falls_to_budget_plus_chunk_for_anchor_methods(tiny, humaneval_prompts):
    method, model, tokenizer = anchorcoder(tiny, laa=False)
    prompt = tokenizer(humaneval_prompts[4]).input_ids
    peaks = {}
    for chunk in (None, 16):
        settings = GenerationSettings(max_new_tokens=4, stop_at_eos=False, prefill_chunk=chunk)
        peaks[chunk] = GenerationEngine(model, tokenizer, method, settings).generate([prompt])[0].kv
    assert peaks[None].entries_final == peaks[16].entries_final
    assert peaks[16].entries_peak < 0.6 * peaks[None].entries_peak  # one-shot holds the whole prompt first


def test_bad_chunk_and_methods_that_cannot_chunk_are_refused(tiny):
    from anchorcoder.methods import KVMethod

    with pytest.raises(ConfigError, match="generation.prefill_chunk must be >= 1"):
        GenerationSettings(prefill_chunk=0)

    class OneShot(KVMethod):
        name = "one_shot"
        chunked_prefill = False

    with pytest.raises(ConfigError, match="generation.prefill_chunk=null"):
        GenerationEngine(tiny.model, tiny.tokenizer, OneShot(), GenerationSettings(prefill_chunk=32))


@pytest.mark.parametrize("mask_heads", [1, 2, 4], ids=lambda h: f"mask heads {h}")
def test_key_blocked_attention_equals_sdpa(mask_heads):
    """The online softmax over key blocks gives SDPA's output for every mask layout, fp64 to 1e-12
    (blocks of 64 over 300 keys; rows whose first blocks are all hidden included)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, dtype=torch.float64, generator=gen) for h, n in ((4, 37), (2, 300), (2, 300)))
    mask = torch.rand(2, mask_heads, 37, 300, generator=gen) > 0.6
    mask[..., :130] &= torch.rand(2, mask_heads, 37, 1, generator=gen) > 0.5  # some rows see nothing before 130
    mask[..., 299] = True
    full = mask if mask_heads != 2 else repeat_kv_heads(mask, 2)
    reference = F.scaled_dot_product_attention(q, repeat_kv_heads(k, 2), repeat_kv_heads(v, 2), attn_mask=full)
    ours = attention.key_blocked_attention(q, k, v, mask, None, block=64)
    assert (ours - reference.transpose(1, 2)).abs().max().item() < 1e-12


@pytest.mark.parametrize("variant", ["dense", "TAA+LAA+MHPE", "anllm AC"])
def test_chunks_over_a_long_cache_attend_by_key_blocks_exactly(tiny, monkeypatch, variant):
    """With the key-blocked path switched on from 16 keys (blocks of 8), chunked prefill still equals
    the masked forward (and the one-shot logits for dense)."""
    if variant == "dense":
        method, model = build_method({"name": "dense"}), tiny.model
        ids = torch.randint(100, 1000, (1, PROMPT + NEW), generator=torch.Generator().manual_seed(1))
    else:
        method, model, _, ids = anchor_method(tiny, variant)
    calls = []
    blocked = attention.key_blocked_attention
    monkeypatch.setattr(attention, "KEY_BLOCKED_FROM", 16)
    monkeypatch.setattr(attention, "key_blocked_attention", lambda *a, **kw: calls.append(1) or blocked(*a, block=8))
    with torch.inference_mode():
        reference = masked_forward(model, method, ids, prompt_lengths=[PROMPT] * ids.shape[0]).logits
    ours = incremental_logits(model, method, ids, schedule(7), prompt=PROMPT)
    assert calls, "the key-blocked path was not taken"
    assert (ours - reference).abs().max().item() < 1e-4


def test_left_padded_chunks_by_key_blocks_give_the_one_shot_results(tiny, humaneval_prompts, monkeypatch):
    """Padding rows and per-row lengths through the key-blocked path: greedy tokens and KV held as
    one-shot prefill (anchorcoder with LAA and MHPE, blocks of 4 keys from 8)."""
    method = build_method({"name": "anchorcoder", "mhpe": True})
    method.prepare(tiny.model, tiny.tokenizer)
    prompts = [tiny.tokenizer(p).input_ids[:n] for p, n in zip(humaneval_prompts[:3], (70, 23, 51), strict=True)]

    def run(chunk):
        settings = GenerationSettings(max_new_tokens=12, batch_size=3, stop_at_eos=False, prefill_chunk=chunk)
        return GenerationEngine(tiny.model, tiny.tokenizer, method, settings).generate(prompts)

    one_shot, calls = run(None), []
    blocked = attention.key_blocked_attention
    monkeypatch.setattr(attention, "KEY_BLOCKED_FROM", 8)
    monkeypatch.setattr(attention, "key_blocked_attention", lambda *a, **kw: calls.append(1) or blocked(*a, block=4))
    chunked = run(7)
    assert calls, "the key-blocked path was not taken"
    assert [r.token_ids for r in chunked] == [r.token_ids for r in one_shot]
    assert [r.kv.entries_final for r in chunked] == [r.kv.entries_final for r in one_shot]
