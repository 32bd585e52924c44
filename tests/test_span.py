"""Sentinel-token span compression (``method=span``): the rule, positions, labels, policies, the
equivalence of the masked forward with incremental decoding and real deletion, and the engine."""

from __future__ import annotations

import copy

import pytest
import torch

from anchorcoder.generation import GenerationEngine, GenerationSettings
from anchorcoder.generation.engine import incremental_logits, model_kv_shape
from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import IGNORE_INDEX, masked_forward
from anchorcoder.methods.span import CL, CR, ORD, SPAN, draw_spans, kept_entries
from anchorcoder.registry import ConfigError
from anchorcoder.training.data import Document, PackedCollator, pack_documents
from tests.test_anllm import pattern


def span_method(loaded, **options):
    """A prepared span method on a private copy of the model (it adds <CL> and <CR>)."""
    model, tokenizer = copy.deepcopy(loaded.model), copy.deepcopy(loaded.tokenizer)
    method = build_method({"name": "span", **options})
    method.prepare(model, tokenizer)
    return method, model, tokenizer


# two spans, adjacent spans, a span at the start and an unclosed span:
#   <CL> a b <CR> c <CL> d <CR> <CL> e f <CR> g <CL> h i
GOLDEN = """
x...............
.x..............
.xx.............
xxxx............
...xx...........
.....x..........
...xx.x.........
.....xxx........
........x.......
...xx..x.x......
...xx..x.xx.....
........xxxx....
...xx..x...xx...
.............x..
...xx..x...xx.x.
...xx..x...xx.xx
"""


def golden_ids(method, tokenizer) -> tuple[torch.Tensor, list[int]]:
    words = tokenizer(" a b c d e f g h i", add_special_tokens=False).input_ids
    assert len(words) == 9
    a, b, c, d, e, f, g, h, i = words
    cl, cr = method.anchor_ids
    return torch.tensor([[cl, a, b, cr, c, cl, d, cr, cl, e, f, cr, g, cl, h, i]]), words


def test_golden_mask_positions_and_labels(tiny):
    method, _, tokenizer = span_method(tiny)
    ids, words = golden_ids(method, tokenizer)
    a, b, c, d, e, f, g, h, i = words
    assert pattern(method.attention_mask(ids)[0, 0]) == GOLDEN.strip()
    tokens = method.training_tokens(ids)
    assert tokens.kind[0].tolist() == [CL, SPAN, SPAN, CR, ORD, CL, SPAN, CR, CL, SPAN, SPAN, CR, ORD, CL, SPAN, SPAN]
    assert tokens.seg[0].tolist() == [0, 0, 0, 0, -1, 1, 1, 1, 2, 2, 2, 2, -1, 3, 3, 3]
    # sentinels add no distance: <CL> at the position of the token before it, <CR> at its span's last token's
    assert tokens.pos[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 5, 5, 6, 6, 7, 8]
    labels = method.training_labels(ids, ids.clone())
    no = IGNORE_INDEX  # label j+1 is what the logits at j learn; sentinels never learn nor are learnt
    assert labels[0].tolist() == [no, no, b, c, no, d, no, e, no, no, f, g, no, h, no, i]
    # the adjacent spans d <CR> <CL> e: the released code made <CL> the target of d; here d predicts e
    assert not set(labels[0].tolist()) & set(method.anchor_ids)


def test_block_mask_matches_the_boolean_mask(tiny):
    from torch.nn.attention.flex_attention import flex_attention

    method, _, tokenizer = span_method(tiny)
    ids, _ = golden_ids(method, tokenizer)
    ids = torch.cat([ids, ids[:, :9]], dim=1)[:, :24]
    padding = torch.ones_like(ids, dtype=torch.bool)
    padding[:, 20:] = False
    q, k, v = (torch.randn(1, 2, 24, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    mask = method.attention_mask(ids, padding)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    blocks = method.block_mask(ids, padding, block_size=8)
    assert (flex_attention(q, k, v, block_mask=blocks) - expected).abs().max().item() < 1e-5


def with_spans(method, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows of random ids with the random training sampler's spans (cut to the rows' length)."""
    rows = []
    for r, row in enumerate(ids.tolist()):
        spaced = build_method({"name": "span", "ratio": 0.6, "max_span": 6, "seed": seed + r})
        spaced._cl, spaced._cr, spaced.hidden_token_ids = method._cl, method._cr, method.hidden_token_ids
        rows.append(spaced.training_piece(row, 0, 10**6)[0][: ids.shape[1]])
    return torch.tensor(rows)


def schedule(chunk: int | None, prompt: int, total: int) -> list[int]:
    chunk = chunk or prompt
    return [min(chunk, prompt - s) for s in range(0, prompt, chunk)] + [1] * (total - prompt)


@pytest.mark.parametrize("chunk", [None, 1, 7], ids=lambda c: f"chunk {c or 'whole'}")
def test_masked_forward_equals_incremental_decoding_with_deletion(tiny, chunk):
    """Random spans (adjacent ones and an unclosed one at the end included), two rows: the logits of
    one masked forward are those of feeding the rows through the cache, spans deleted as they close."""
    method, model, _ = span_method(tiny)
    ids = with_spans(method, torch.randint(100, 1000, (2, 90), generator=torch.Generator().manual_seed(4)), 1)
    cl, cr = method.anchor_ids
    assert (ids == cl).sum() >= 6 and (ids == cr).sum() >= 6
    held = []
    with torch.inference_mode():
        reference = masked_forward(model, method, ids).logits
    ours = incremental_logits(
        model, method, ids, schedule(chunk, 40, 90), prompt=40, observe=lambda c, end: held.append((end, c))
    )
    assert (ours - reference).abs().max().item() < 1e-4
    kinds = method.training_tokens(ids).kind.tolist()
    layers, heads, _ = model_kv_shape(model)
    end, cache = held[-1]
    per_row = cache.entries_per_row().tolist()
    assert per_row == [layers * heads * kept_entries(k[:end]) for k in kinds]  # ordinary + <CR> + the open span


@pytest.mark.slow
def test_equivalence_on_smollm2_in_float64(smollm2, humaneval_prompts):
    """The real model, random spans over real code: fp64 < 1e-8 (fp32's figure is printed)."""
    method, model, tokenizer = span_method(smollm2)
    code = tokenizer("".join(humaneval_prompts[:2]), add_special_tokens=False).input_ids[:150]
    ids = torch.tensor([method.training_piece(code, 0, 10**6)[0]])
    for dtype, bound in ((torch.float32, 1e-3), (torch.float64, 1e-8)):
        model = model.to(dtype)
        with torch.inference_mode():
            reference = masked_forward(model, method, ids).logits
        for chunk in (None, 16):
            ours = incremental_logits(model, method, ids, schedule(chunk, 64, ids.shape[1]), prompt=64)
            gap = (ours - reference).abs().max().item()
            print(f"span on SmolLM2, {dtype}, chunk {chunk}: max |logit gap| {gap:.2e}")
            assert gap < bound


def test_policies_insert_sentinels_where_they_say(tiny):
    method, _, tokenizer = span_method(tiny)
    cl, cr = method.anchor_ids
    lines = tokenizer("x = 1\ny = 2\nz = 3\nw", add_special_tokens=False).input_ids
    one = method.insert_spans(lines)
    assert one.count(cl) == 4 and one.count(cr) == 3 and one[0] == cl  # every line closed but the last, open
    two = build_method({"name": "span", "span_lines": 2})
    two._cl, two._cr, two._newlines, two.hidden_token_ids = cl, cr, method._newlines, method.hidden_token_ids
    assert two.insert_spans(lines).count(cr) == 1
    chunks = build_method({"name": "span", "policy": "chunks", "span_tokens": 4})
    chunks._cl, chunks._cr = cl, cr
    out = chunks.insert_spans(list(range(100, 111)))
    assert out == [cl, 100, 101, 102, 103, cr, cl, 104, 105, 106, 107, cr, cl, 108, 109, 110]
    # the engine's view: the same decision for a generated token
    assert chunks.tokens_before(out, [], 111) == []
    assert chunks.tokens_before(out + [111], [], 112) == [cr, cl]
    assert chunks.tokens_before([1, 2], [], 3) == [cl]  # nothing open (compress_prompt=false prompt): open one


def test_random_sampler_hits_the_net_ratio_and_respects_boundaries(tiny):
    import random

    spans = draw_spans(10_000, 0.5, 2, 25, True, random.Random(0))
    covered = sum(e - s for s, e in spans)
    assert abs((covered - len(spans)) / 10_000 - 0.5) < 0.05  # net: each span leaves its <CR>
    assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans[:-1], spans[1:], strict=True))  # no overlap
    method, _, _ = span_method(tiny)
    cl, cr = method.anchor_ids
    ids = list(range(100, 400))
    piece, prompt_len = method.training_piece(ids, 100, 280)
    assert len(piece) <= 280 and piece == method.training_piece(ids, 100, 280)[0]  # seeded
    assert [t for t in piece[:prompt_len] if t not in (cl, cr)] == ids[:100]  # no span crosses the prompt's end
    assert piece[:prompt_len].count(cl) == piece[:prompt_len].count(cr)
    assert piece.count(cl) == piece.count(cr)  # the length limit cuts no span
    whole, kept_prompt = build_method({"name": "span", "compress_prompt": False}), None
    whole._cl, whole._cr, whole.hidden_token_ids = cl, cr, method.hidden_token_ids
    piece, kept_prompt = whole.training_piece(ids, 100, 10**6)
    assert piece[:100] == ids[:100] and kept_prompt == 100


def test_packed_spans_stay_in_their_documents(tiny):
    """Random spans drawn per piece: each packed document's logits equal its own forward."""
    method, model, tokenizer = span_method(tiny)
    texts = ["def f(x):\n    return x + 1\n" * 3, "import os\nprint(os.sep)\n" * 4]
    rows = pack_documents([Document(str(i), t) for i, t in enumerate(texts)], method, tokenizer, 400)
    [row] = rows
    assert all(piece.count(method.anchor_ids[0]) for piece in row)
    batch = PackedCollator(tokenizer.pad_token_id, method.training_labels)([row])
    assert not set(batch["labels"].flatten().tolist()) & set(method.anchor_ids)
    with torch.no_grad():
        packed = masked_forward(model, method, batch["input_ids"], batch["padding_mask"], doc_ids=batch["doc_ids"])
        start = 0
        for piece in row:
            alone = masked_forward(model, method, torch.tensor([list(piece)])).logits[0]
            torch.testing.assert_close(packed.logits[0, start : start + len(piece)], alone, atol=1e-5, rtol=0)
            start += len(piece)


def test_engine_generates_through_spans(tiny, humaneval_prompts):
    """Greedy generation with the chunk policy: every chosen token is the masked forward's argmax at the
    last real token before it (sentinels are fed, never sampled from), the text has no sentinel, and
    the cache holds ordinary tokens, <CR>s and the open span exactly; batched = alone."""
    method, model, tokenizer = span_method(tiny, policy="chunks", span_tokens=8)
    prompts = [method.encode(tokenizer, p) for p in humaneval_prompts[:3]]
    cl, cr = method.anchor_ids
    prompts = [
        p[: max(i for i in range(n) if p[i] not in (cl, cr)) + 1] for p, n in zip(prompts, (60, 31, 47), strict=True)
    ]
    settings = GenerationSettings(max_new_tokens=40, batch_size=3, stop_at_eos=False)
    results = GenerationEngine(model, tokenizer, method, settings).generate(prompts)
    layers, heads, _ = model_kv_shape(model)
    for prompt, result in zip(prompts, results, strict=True):
        stream = prompt + result.token_ids
        assert result.token_ids.count(cr) >= 1 and "<CL>" not in result.text and "<CR>" not in result.text
        with torch.inference_mode():
            logits = masked_forward(model, method, torch.tensor([stream[:-1]])).logits[0]
        for i in range(len(prompt), len(stream)):
            if stream[i] in (cl, cr):
                continue
            source = max(j for j in range(i) if stream[j] not in (cl, cr))
            assert int(logits[source].argmax()) == stream[i]
        kinds = method.training_tokens(torch.tensor([stream[:-1]])).kind[0].tolist()
        assert result.kv.entries_final == layers * heads * kept_entries(kinds)
        assert result.kv.dense_entries_final == layers * heads * sum(t not in (cl, cr) for t in stream[:-1])
    alone = GenerationEngine(model, tokenizer, method, GenerationSettings(max_new_tokens=40, stop_at_eos=False))
    assert [r.token_ids for r in alone.generate(prompts)] == [r.token_ids for r in results]


def test_bad_options_are_refused():
    for options, key in (
        ({"policy": "words"}, "method.policy"),
        ({"training_policy": "gist"}, "method.training_policy"),
        ({"span_lines": 0}, "method.span_lines"),
        ({"min_span": 5, "max_span": 3}, "method.min_span"),
        ({"sink_tokens": 4}, "method.sink_tokens"),
    ):
        with pytest.raises(ConfigError, match=key):
            build_method({"name": "span", **options})


def test_train_py_trains_span(tmp_path):
    """``train.py method=span``: LoRA with the sentinel rows trainable, random spans, a finite loss."""
    from tests.test_training import train

    metrics = train(tmp_path / "run", "method=span")
    assert metrics["steps"] == 4 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert (tmp_path / "run" / "final" / "method.yaml").read_text().count("span") >= 1


def test_teacher_forced_likelihood_is_the_masked_forwards(tiny, humaneval_prompts):
    """code_ppl's path: targets are plain tokens, the engine inserts the sentinels while feeding them,
    and the summed NLL is the masked forward's at each target's last real token before it."""
    method, model, tokenizer = span_method(tiny, policy="chunks", span_tokens=8)
    cl, cr = method.anchor_ids
    prompt = method.encode(tokenizer, humaneval_prompts[0])[:50]
    while prompt[-1] in (cl, cr):
        prompt.pop()
    target = method.encode_continuation(tokenizer, humaneval_prompts[1])[:30]
    settings = GenerationSettings(max_new_tokens=64, stop_at_eos=False)
    [result] = GenerationEngine(model, tokenizer, method, settings).generate([prompt], targets=[target])
    assert [t for t in result.token_ids if t not in (cl, cr)] == target and cr in result.token_ids
    stream = prompt + result.token_ids
    with torch.inference_mode():
        logprobs = masked_forward(model, method, torch.tensor([stream[:-1]])).logits[0].log_softmax(-1)
    nll = 0.0
    for i in range(len(prompt), len(stream)):
        if stream[i] not in (cl, cr):
            source = max(j for j in range(i) if stream[j] not in (cl, cr))
            nll -= float(logprobs[source, stream[i]])
    assert abs(nll - result.nll) < 1e-3
