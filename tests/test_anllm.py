"""AnLLM anchor tokens: the AnSAN mask, anchor insertion, and the invariant tying training to inference
(one masked forward == incremental decoding with the cache really pruned)."""

from __future__ import annotations

import copy

import pytest
import torch

from anchorcoder.generation import GenerationEngine, GenerationSettings
from anchorcoder.generation.cache import GROWTH
from anchorcoder.generation.engine import incremental_logits, model_kv_shape
from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import kept_count, masked_forward
from anchorcoder.methods.sentences import insert_after_sentences, sentence_ends
from anchorcoder.registry import ConfigError
from tests.conftest import compose_config

# The research note's golden pattern for BOS a b <A> c d <A> e f (x = visible)
GOLDEN = """
x........
xx.......
xxx......
xxxx.....
...xx....
...xxx...
....xxx..
...x..xx.
...x..xxx
"""


def pattern(mask: torch.Tensor) -> str:
    return "\n".join("".join("x" if v else "." for v in row) for row in mask.tolist())


def anllm(variant: str, loaded, **options):
    """A prepared AnLLM on a private copy of the model (AC resizes it; the session fixture stays intact)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if variant == "ac":
        model, tokenizer = copy.deepcopy(model), copy.deepcopy(tokenizer)
    method = build_method({"name": "anllm", "variant": variant, **options})
    method.prepare(model, tokenizer)
    return method, model, tokenizer


def with_anchors(method, ids: torch.Tensor, every: float, seed: int) -> torch.Tensor:
    """Random ids with anchor tokens at random places (never at position 0)."""
    generator = torch.Generator().manual_seed(seed)
    ids = ids.clone()
    where = torch.rand(ids.shape, generator=generator) < every
    where[:, 0] = False
    ids[where] = method.anchor_ids[0]
    return ids


# ---------------------------------------------------------------------------- the mask
@pytest.mark.parametrize("variant", ["ep", "ac"])
def test_golden_mask(tiny, variant):
    method, _, tokenizer = anllm(variant, tiny)
    anchor = method.anchor_ids[0]
    words = tokenizer(" a b c d e f", add_special_tokens=False).input_ids
    assert len(words) == 6
    ids = torch.tensor([[tokenizer.bos_token_id, *words[:2], anchor, *words[2:4], anchor, *words[4:]]])
    assert pattern(method.attention_mask(ids)[0, 0]) == GOLDEN.strip()
    sink = build_method({"name": "anllm", "variant": variant, "sink_tokens": 1})
    sink._anchor_ids = method._anchor_ids
    with_sink = method.attention_mask(ids)[0, 0] | (torch.ones(9, 9, dtype=torch.bool).tril() & (torch.arange(9) == 0))
    assert torch.equal(sink.attention_mask(ids)[0, 0], with_sink)  # BOS column visible to all, nothing else


def slow_rule(is_anchor: list[bool], real: list[bool]) -> torch.Tensor:
    """The sentence-level rule read literally, one (query, key) pair at a time."""
    n = len(is_anchor)
    tokens = [i for i in range(n) if real[i]]
    seg, count = {}, 0
    for i in tokens:
        seg[i] = count
        count += is_anchor[i]
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if not real[i]:
            out[i, i] = True
            continue
        for j in tokens:
            if j > i:
                continue
            own = seg[j] == seg[i]
            earlier_anchor = is_anchor[j] and not is_anchor[i] and seg[j] < seg[i]
            out[i, j] = own or earlier_anchor
    return out


def test_mask_equals_the_literal_rule_on_random_padded_batches(tiny):
    method, _, _ = anllm("ep", tiny)
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        lengths = torch.randint(1, 60, (3,), generator=generator).tolist()
        width = max(lengths)
        ids = torch.randint(100, 1000, (3, width), generator=generator)
        ids[torch.rand(ids.shape, generator=generator) < 0.2] = method.anchor_ids[0]
        padding = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        mask = method.attention_mask(ids, padding)[:, 0]
        for r in range(3):
            anchors = (ids[r] == method.anchor_ids[0]) & padding[r]
            assert torch.equal(mask[r], slow_rule(anchors.tolist(), padding[r].tolist())), (trial, r)
            assert bool(mask[r].diagonal().all())  # never an empty row
            assert not bool(mask[r].triu(1).any())  # causal
            a = anchors.nonzero().flatten()
            assert not bool(mask[r][a[:, None], a[None, :]].tril(-1).any())  # anchors never see earlier anchors


def test_block_mask_matches_the_boolean_mask(tiny):
    from torch.nn.attention.flex_attention import flex_attention

    method, _, _ = anllm("ep", tiny)
    ids = with_anchors(method, torch.randint(100, 1000, (2, 96)), 0.1, seed=3)
    padding = torch.ones_like(ids, dtype=torch.bool)
    padding[1, 80:] = False
    dense = method.attention_mask(ids, padding)
    blocks = method.block_mask(ids, padding, block_size=32)
    q, k, v = (torch.randn(2, 4, 96, 16) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert (flex_attention(q, k, v, block_mask=blocks) - expected).abs().max().item() < 1e-5
    assert blocks.sparsity() > 0  # whole blocks skipped


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_masked_forward_in_query_blocks_equals_one_block(tiny, kernel, monkeypatch):
    """The training forward skips the blocks above the diagonal; the logits must not change."""
    from anchorcoder.generation import attention
    from anchorcoder.generation.attention import set_kernel

    method, model, _ = anllm("ep", tiny)
    ids = with_anchors(method, torch.randint(100, 1000, (2, 100)), 0.1, seed=11)
    padding = torch.ones_like(ids, dtype=torch.bool)
    padding[1, 70:] = False
    set_kernel(model, kernel)
    try:
        with torch.inference_mode():
            whole = masked_forward(model, method, ids, padding).logits
            monkeypatch.setattr(attention, "TRAINING_CHUNK", 16)
            blocks = masked_forward(model, method, ids, padding).logits
            plain = model(input_ids=ids, attention_mask=method.attention_mask(ids, padding)).logits
    finally:
        set_kernel(model, "sdpa")
    assert (blocks - whole).abs().max().item() < 1e-5
    if kernel == "sdpa":  # the boolean mask straight into transformers' own SDPA path: the same logits
        assert (plain[padding] - whole[padding]).abs().max().item() < 1e-5


@pytest.mark.slow
def test_masked_forward_with_flex_attention_model(tiny):
    """A model on transformers' flex_attention gets the BlockMask (compiles once: ~30 s on CPU)."""
    method, _, _ = anllm("ep", tiny)
    model = copy.deepcopy(tiny.model)
    ids = with_anchors(method, torch.randint(100, 1000, (2, 256)), 0.1, seed=12)
    with torch.inference_mode():
        reference = masked_forward(model, method, ids).logits
        model.set_attn_implementation("flex_attention")
        flex = masked_forward(model, method, ids).logits
    assert (flex - reference).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------- inserting anchors
def test_sentence_ends_in_prose_comments_and_docstrings():
    prose = "Dr. Smith paid 3.14 dollars, e.g. for x.y! Was it J. Doe? Yes.\n1. a list item"
    assert (
        insert_after_sentences(prose, "|")
        == "Dr. Smith paid 3.14 dollars, e.g. for x.y!| Was it J. Doe?| Yes.|\n1. a list item"
    )
    code = (
        "import os\n\n"
        "# Sum two numbers\n# and return it\n"
        "def add(a, b):\n"
        '    """Add a and b. Return the sum.\n    >>> add(1.5, 2)\n    3.5\n    """\n'
        "    return a.real + b\n"
    )
    assert insert_after_sentences(code, "|") == (
        "import os|\n\n"
        "# Sum two numbers\n# and return it|\n"
        "def add(a, b):\n"
        '    """Add a and b.| Return the sum.|\n    >>> add(1.5, 2)\n    3.5|\n    """\n'
        "    return a.real + b\n"
    )
    assert sentence_ends("") == [] and sentence_ends("no end here") == []
    assert insert_after_sentences('def f():\n    """Return x."""\n', "|") == 'def f():\n    """Return x.|"""\n'
    assert insert_after_sentences("Sort it.<|im_end|>\r\n\r\nnext", "|") == "Sort it.|<|im_end|>\r\n\r\nnext"


def test_ac_adds_a_mean_initialised_token_once_and_hides_it(tiny):
    model, tokenizer = copy.deepcopy(tiny.model), copy.deepcopy(tiny.tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    mean = model.get_input_embeddings().weight.mean(dim=0).clone()
    method = build_method({"name": "anllm", "variant": "ac"})
    method.prepare(model, tokenizer)
    (ac,) = method.anchor_ids
    assert tokenizer.convert_ids_to_tokens(ac) == "<AC>" and ac == rows
    assert model.get_input_embeddings().weight.shape[0] == rows + 1
    assert torch.allclose(model.get_input_embeddings().weight[ac], mean)
    trained = torch.full_like(mean, 0.5)
    with torch.no_grad():
        model.get_input_embeddings().weight[ac] = trained
    again = build_method({"name": "anllm", "variant": "ac"})
    again.prepare(model, tokenizer)  # a checkpoint that has <AC> keeps its row
    assert again.anchor_ids == [ac] and torch.equal(model.get_input_embeddings().weight[ac], trained)

    ids = method.encode(tokenizer, "First sentence. Second one! Open", add_special_tokens=False)
    assert ids.count(ac) == 2 and tokenizer.decode([t for t in ids if t != ac]) == "First sentence. Second one! Open"
    engine = GenerationEngine(model, tokenizer, method, GenerationSettings(max_new_tokens=1))
    assert engine._decode_continuation(ids[:3], ids[3:]) == " Second one! Open"  # <AC> never reaches text


def test_config_errors_name_the_key_and_the_valid_values():
    with pytest.raises(ConfigError, match=r"method.variant of method=anllm must be one of ep, ac; got 'xx'"):
        build_method({"name": "anllm", "variant": "xx"})
    with pytest.raises(ConfigError, match="method.ac_init"):
        build_method({"name": "anllm", "ac_init": "zeros"})
    cfg = compose_config(overrides=["method=anllm", "method.variant=ep"])
    assert build_method(cfg["method"]).variant == "ep"


# ---------------------------------------------------------------------------- the invariant
CHUNKINGS = {
    "one forward": lambda t: [t],
    "token by token": lambda t: [1] * t,
    "prefill + decode": lambda t: [24] + [1] * (t - 24),
    "chunks into a pruned cache": lambda t: [24, 5, 7] + [1] * (t - 36),
}


def equivalence_error(model, method, ids, chunking: str) -> float:
    with torch.inference_mode():
        reference = masked_forward(model, method, ids).logits
    ours = incremental_logits(model, method, ids, CHUNKINGS[chunking](ids.shape[1]))
    return (ours - reference).abs().max().item()


def float32_rounding(model, model64, method, ids, **masked) -> float:
    """max |logits| between the float32 and the float64 masked forward: the rounding this machine's
    kernels add to one face. Two float32 faces of the same function may fairly differ by about twice it."""
    with torch.inference_mode():
        ours = masked_forward(model, method, ids, **masked).logits.double()
        return (ours - masked_forward(model64, method, ids, **masked).logits).abs().max().item()


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("variant", ["ep", "ac"])
def test_masked_forward_equals_pruned_decoding_tiny(tiny, variant, chunking):
    method, model, _ = anllm(variant, tiny)
    ids = with_anchors(method, torch.randint(100, 1000, (2, 64), generator=torch.Generator().manual_seed(1)), 0.1, 2)
    assert equivalence_error(model, method, ids, chunking) < 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_equivalence_on_other_model_families(model_type):
    """Every family of configs/model: Llama (CodeLlama, DeepSeek-Coder, SmolLM2) and Qwen2 (Qwen2.5-Coder), GQA."""
    from anchorcoder.models import load_model

    cfg = compose_config(overrides=["model=tiny-llama", f"model.architecture.model_type={model_type}"])["model"]
    loaded = load_model(cfg, device="cpu")
    assert type(loaded.model).__name__.lower().startswith(model_type)
    for variant in ("ep", "ac"):
        method, model, _ = anllm(variant, loaded)
        ids = with_anchors(
            method, torch.randint(100, 1000, (2, 48), generator=torch.Generator().manual_seed(4)), 0.15, 5
        )
        assert equivalence_error(model, method, ids, "prefill + decode") < 1e-4


@pytest.mark.slow  # ~40 s each; the tiny-model and other-family versions above run by default
@pytest.mark.parametrize("variant", ["ep", "ac"])
def test_masked_forward_equals_pruned_decoding_smollm2(smollm2, variant):
    """Equal in float64 (measured 1e-13 to 6e-7). In float32 the two faces differ by rounding only, and SmolLM2
    amplifies it: under AnLLM's rule (no sink) rows that lose position 0 grow activations of ~2.4e4,
    and the float32 masked forward alone is up to ~6e-3 from float64 there (4.1e-3 on the CI CPU of
    2026-12-06); with BOS kept as a sink, 7e-5 to 4e-4. The kernels, hence the rounding, vary by CPU,
    so the float32 bound is twice that measured rounding (faces at 1.0-1.2x it), not a constant."""
    method, model, _ = anllm(variant, smollm2)
    ids = with_anchors(method, torch.randint(100, 1000, (2, 64), generator=torch.Generator().manual_seed(6)), 0.08, 7)
    model64 = copy.deepcopy(model).double()
    assert equivalence_error(model64, method, ids, "prefill + decode") < 1e-4
    assert equivalence_error(model64, method, ids, "chunks into a pruned cache") < 1e-4
    with_sink = build_method({"name": "anllm", "variant": variant, "sink_tokens": 1})
    with_sink._anchor_ids = method._anchor_ids
    for rule in (method, with_sink):
        rounding = float32_rounding(model, model64, rule, ids)
        assert equivalence_error(model, rule, ids, "prefill + decode") < 2 * rounding


# ---------------------------------------------------------------------------- the cache
def test_cache_holds_exactly_the_kept_entries_at_every_step(tiny):
    method, model, _ = anllm("ep", tiny)
    ids = with_anchors(method, torch.randint(100, 1000, (1, 50), generator=torch.Generator().manual_seed(8)), 0.1, 9)
    anchors = (ids[0] == method.anchor_ids[0]).tolist()
    layers, kv_heads, head_dim = model_kv_shape(model)
    per_entry = 2 * head_dim * 4  # K and V, float32

    def check(cache, end):
        kept = kept_count(anchors[:end])
        assert all(cache.layer_length(layer) == kept for layer in range(layers))
        assert cache.tensor_bytes() == kept * layers * kv_heads * per_entry  # memory really freed
        if any(anchors[:end]) and anchors[end - 1]:
            free = cache.allocated_bytes() - cache.tensor_bytes()  # pruning allocates what it keeps + growth
            assert free == GROWTH * layers * kv_heads * per_entry
        assert int(cache.positions[0].max()) == end - 1  # absolute positions

    incremental_logits(model, method, ids, [10] + [1] * 40, observe=check)


@pytest.mark.parametrize("variant", ["ep", "ac"])
def test_batched_generation_equals_one_row_at_a_time(tiny, variant):
    """Left-padded rows that prune at different steps give each row's batch-1 tokens and KV figures."""
    method, model, tokenizer = anllm(variant, tiny)
    texts = ["Sort the list. Then return it.\ndef f(x):\n    return x.sort()\n", "One. Two. Three.", "x = 1.5"]
    prompts = [method.encode(tokenizer, t) for t in texts]
    settings = dict(max_new_tokens=24, stop_at_eos=False)
    one = [GenerationEngine(model, tokenizer, method, GenerationSettings(**settings)).generate([p])[0] for p in prompts]
    batch = GenerationEngine(model, tokenizer, method, GenerationSettings(**settings, batch_size=3)).generate(prompts)
    for alone, together in zip(one, batch, strict=True):
        assert together.token_ids == alone.token_ids
        assert together.kv.entries_final == alone.kv.entries_final
        assert together.kv.entries_peak == alone.kv.entries_peak
    layers, kv_heads, _ = model_kv_shape(model)
    for prompt, result in zip(prompts, one, strict=True):
        stream = prompt + result.token_ids[:-1]  # the last token is never fed
        anchors = [t in method.anchor_ids for t in stream]
        assert result.kv.entries_final == kept_count(anchors) * layers * kv_heads
        assert result.kv.bytes_final == result.kv.entries_final * 2 * model_kv_shape(model)[2] * 4
