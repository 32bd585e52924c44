"""Measured KV bytes, and the cache machinery later methods prune through (positions, keep, masks)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from anchorcoder.generation import GenerationEngine, GenerationSettings, KVCache
from anchorcoder.generation.attention import engine_attention
from anchorcoder.generation.cache import GROWTH, take_entries
from anchorcoder.generation.engine import forward_with_cache
from anchorcoder.methods import KVMethod, StepInfo, build_method


def dense_formula_bytes(loaded, tokens_held: int) -> int:
    """2 (K and V) x layers x KV heads x head dim x bytes per element x tokens."""
    cfg = loaded.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = torch.finfo(loaded.model.dtype).bits // 8
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * element * tokens_held


class TensorBytesProbe(KVMethod):
    """Test helper: records the real tensor bytes and the entries of the cache after every step."""

    def __init__(self):
        self.seen = []

    def after_step(self, cache, step):
        self.seen.append((cache.tensor_bytes(), int(cache.entries_per_row().sum()), int(step.positions.max()) + 1))


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_dense_bytes_match_formula(which, request, humaneval_prompts):
    loaded = request.getfixturevalue(which)
    if which == "tiny":
        assert loaded.model.config.num_key_value_heads < loaded.model.config.num_attention_heads  # GQA
    prompt = loaded.tokenizer(humaneval_prompts[2]).input_ids
    probe = TensorBytesProbe()
    engine = GenerationEngine(
        loaded.model, loaded.tokenizer, probe, GenerationSettings(max_new_tokens=12, stop_at_eos=False)
    )
    result = engine.generate([prompt])[0]
    for tensor_bytes, _, tokens in probe.seen:  # every step: bytes of the real tensors == formula
        assert tensor_bytes == dense_formula_bytes(loaded, tokens)
    held = len(prompt) + len(result.token_ids) - 1  # the last token is never fed
    assert result.kv.bytes_final == dense_formula_bytes(loaded, held) == probe.seen[-1][0]
    assert result.kv.bytes_peak == result.kv.bytes_final == result.kv.dense_bytes_final


def test_padding_is_not_counted_as_held(tiny, humaneval_prompts):
    prompts = [tiny.tokenizer(p).input_ids for p in humaneval_prompts[:3]]
    engine = GenerationEngine(
        tiny.model,
        tiny.tokenizer,
        build_method({"name": "dense"}),
        GenerationSettings(max_new_tokens=6, batch_size=3, stop_at_eos=False),
    )
    for result, prompt in zip(engine.generate(prompts), prompts, strict=True):
        assert result.kv.bytes_final == dense_formula_bytes(tiny, len(prompt) + 5)
    widest = max(len(p) for p in prompts) + 5
    held = 3 * dense_formula_bytes(tiny, widest)  # padding included in the allocation, not in what is held
    assert held <= engine.stats.kv_tensor_bytes_peak <= held + 3 * dense_formula_bytes(tiny, GROWTH)


def test_appending_writes_in_place_and_keeps_at_most_growth_free_slots():
    torch.manual_seed(0)
    cache = KVCache(1, 2, 4, growth=3)
    keys, values = torch.randn(1, 2, 12, 4), torch.randn(1, 2, 12, 4)
    cache.begin_step(torch.arange(5)[None])
    cache.update(keys[:, :, :5], values[:, :, :5], 0)
    assert cache.allocated_bytes() == cache.tensor_bytes()  # the prefill allocates exactly what it holds
    stores = []
    for t in range(5, 12):
        cache.begin_step(torch.tensor([[t]]), "decode")
        k, v = cache.update(keys[:, :, t : t + 1], values[:, :, t : t + 1], 0)
        assert torch.equal(k, keys[:, :, : t + 1]) and torch.equal(v, values[:, :, : t + 1])
        stores.append(k.untyped_storage().data_ptr())
        free_slots = (cache.allocated_bytes() - cache.tensor_bytes()) // (2 * 2 * 4 * 4)
        assert 0 <= free_slots <= 3
    # one new allocation per 1 + growth appended steps, the rest written in place
    assert len(set(stores)) == 2 and stores[:4] == [stores[0]] * 4 and stores[4:] == [stores[4]] * 3
    cache.keep(0, torch.tensor([[0, 11]]))  # pruning allocates what it keeps + growth free slots
    entry = 2 * 2 * 4 * 4  # K and V, 2 heads, 4 dims, float32
    assert cache.tensor_bytes() == 2 * entry and cache.allocated_bytes() == (2 + 3) * entry
    assert torch.equal(cache.keys[0], keys[:, :, [0, 11]]) and torch.equal(cache.values[0], values[:, :, [0, 11]])
    store = cache.keys[0].untyped_storage().data_ptr()
    cache.begin_step(torch.tensor([[12]]), "decode")
    new = torch.randn(1, 2, 1, 4)
    k, _ = cache.update(new, new, 0)  # the next step appends in place: no second copy of what was kept
    assert k.untyped_storage().data_ptr() == store and torch.equal(k[:, :, -1:], new)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_take_entries_equals_gather(per_head, transposed):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 2, 5).transpose(1, 2) if transposed else torch.randn(3, 2, 7, 5)  # [B, H, S, D]
    x = x[:, :, 1:]  # a view with an offset, as the cache's views of its allocations
    index = torch.randint(0, 6, (3, 2, 4) if per_head else (3, 4))
    full = index if per_head else index[:, None, :].expand(-1, 2, -1)
    expected = torch.gather(x, 2, full[..., None].expand(-1, -1, -1, 5))
    assert torch.equal(take_entries(x, index), expected)
    assert torch.equal(take_entries(x, index, room=3)[:, :, :4], expected)


@dataclass
class KeepRecent(KVMethod):
    """Test method: after every step keep the last ``window`` entries (optionally through per-head indices)."""

    window: int = 6
    per_head: bool = False

    def after_step(self, cache: KVCache, step: StepInfo) -> None:
        for layer in range(cache.num_layers):
            length = cache.layer_length(layer)
            if length <= self.window:
                continue
            index = torch.arange(length - self.window, length).expand(cache.keys[layer].shape[0], -1)
            if self.per_head:
                index = index[:, None, :].expand(-1, cache.num_kv_heads, -1)
            cache.keep(layer, index)


def windowed_reference_logits(model, ids: torch.Tensor, prompt_len: int, window: int) -> torch.Tensor:
    """One masked forward (SDPA, boolean mask): prompt tokens see the causal prefix; later token t sees [t - window, t]."""
    length = ids.shape[1]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = (j <= i) & ((i < prompt_len) | (j >= i - window))
    return model(input_ids=ids, attention_mask=allowed[None, None]).logits[0]


@pytest.mark.parametrize("per_head", [False, True])
def test_pruned_decoding_equals_masked_forward(tiny, per_head):
    """The invariant trained methods rely on, checked on a toy eviction rule with real deletion."""
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (1, 30))
    prompt_len, window = 10, 6
    reference = windowed_reference_logits(tiny.model, ids, prompt_len, window)
    method = KeepRecent(window=window, per_head=per_head)
    cache = KVCache(2, 2, tiny.model.config.head_dim)
    logits = []
    with engine_attention(tiny.model), torch.inference_mode():
        steps = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, ids.shape[1])]
        for start, end in steps:
            positions = torch.arange(start, end)[None]
            out = forward_with_cache(tiny.model, cache, method, ids[:, start:end], positions)
            logits.append(out.logits[0])
            method.after_step(cache, StepInfo(ids[:, start:end], positions, "decode"))
            for layer in range(2):  # memory really freed: the tensors are exactly the window
                assert cache.keys[layer].shape[2] == min(end, window)
    ours = torch.cat(logits)
    assert (ours - reference).abs().max().item() < 1e-4
    last_position = cache.positions[0][0, 0, -1] if per_head else cache.positions[0][0, -1]
    assert last_position.item() == ids.shape[1] - 1  # absolute, not the stored length


def test_keep_frees_the_old_tensors(tiny):
    cache = KVCache(1, 2, 4, growth=2)
    cache.begin_step(torch.arange(8)[None])
    cache.update(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 0)
    old = cache.keys[0].untyped_storage().data_ptr()
    cache.keep(0, torch.tensor([[1, 5]]))
    assert cache.keys[0].shape == (1, 2, 2, 4)
    assert cache.keys[0].untyped_storage().nbytes() == (2 + 2) * 2 * 4 * 4  # a new, small allocation (+ growth)
    assert cache.keys[0].untyped_storage().data_ptr() != old
    assert cache.positions[0].tolist() == [[1, 5]]
    assert cache.tensor_bytes() == 2 * (2 * 2 * 4 * 4)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_padded_batch_per_head_eviction_matches_each_row_alone(tiny, kernel):
    """Left padding + per-KV-head pruning + both kernels: every row equals its own masked forward."""
    from anchorcoder.generation.attention import set_kernel

    torch.manual_seed(1)
    lengths, total_new, window = [10, 7], 8, 6
    rows = [torch.randint(5, 1000, (n + total_new,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros((2, width), dtype=torch.long)
    pos = torch.full((2, width), -1)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = rows[r][:n]
        pos[r, width - n :] = torch.arange(n)
    references = [
        windowed_reference_logits(tiny.model, rows[r][None], n, window)[n - 1 :] for r, n in enumerate(lengths)
    ]
    method = KeepRecent(window=window, per_head=True)
    cache = KVCache(2, 2, tiny.model.config.head_dim)
    set_kernel(tiny.model, kernel)
    try:
        with engine_attention(tiny.model), torch.inference_mode():
            step_logits = []
            feed, positions = ids, pos
            for t in range(total_new + 1):
                out = forward_with_cache(tiny.model, cache, method, feed, positions)
                step_logits.append(out.logits[:, -1])
                method.after_step(cache, StepInfo(feed, positions, "decode"))
                if t == total_new:
                    break
                feed = torch.stack([rows[r][lengths[r] + t] for r in range(2)])[:, None]
                positions = torch.tensor([[lengths[r] + t] for r in range(2)])
        ours = torch.stack(step_logits, dim=1)  # [2, steps, V]
        for r in range(2):
            assert (ours[r] - references[r]).abs().max().item() < 1e-4
    finally:
        set_kernel(tiny.model, "sdpa")


def test_continuation_keeps_the_leading_space_of_sentencepiece_decoders():
    """Llama-style decoders strip one leading space from a string; a completion must not lose it."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁▁▁": 1, "▁return": 2, "▁x": 3, "def": 4, ":": 5, "<0x0A>": 6}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    assert tokenizer.decode([1, 2, 3]) == "   return x"  # decoding the new tokens alone: one space short
    engine = SimpleNamespace(tokenizer=tokenizer, method=build_method({"name": "dense"}))
    assert GenerationEngine._decode_continuation(engine, [4, 5], [1, 2, 3]) == "    return x"  # 3 + 1 spaces


@pytest.mark.parametrize("transposed_output", [False, True])
@pytest.mark.parametrize("mask_heads", [None, 1, 2, 6])
def test_packed_decode_attention_equals_repeated_kv_heads(mask_heads, transposed_output, monkeypatch):
    """One query per row, 6 query heads on 2 KV heads: packing the groups == repeating K/V (eager).

    ``transposed_output``: SDPA returns its output stored as [B, G, H_kv, D] (CUDA's memory-efficient
    kernel does), which a ``view`` of the result cannot take.
    """
    from types import SimpleNamespace

    from anchorcoder.generation.attention import eager_attention, packed_decode_attention, repeat_kv_heads

    if transposed_output:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(
            torch.nn.functional,
            "scaled_dot_product_attention",
            lambda *a, **k: sdpa(*a, **k).transpose(1, 2).contiguous().transpose(1, 2),
        )
    torch.manual_seed(0)
    module = SimpleNamespace(training=False)
    query, key, value = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 11, 8), torch.randn(3, 2, 11, 8)
    mask = None if mask_heads is None else torch.rand(3, mask_heads, 1, 11) > 0.4
    if mask is not None:
        mask[..., 0] = True  # no empty row
    ours, _ = packed_decode_attention(module, query, key, value, mask, 0.3)
    full_mask = None if mask is None else repeat_kv_heads(mask, 6 // mask_heads)
    reference, _ = eager_attention(module, query, key, value, full_mask, 0.3)
    assert ours.shape == reference.shape == (3, 1, 6, 8)
    assert (ours - reference).abs().max().item() < 1e-5
