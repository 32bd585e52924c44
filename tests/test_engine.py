"""The engine against transformers' own generate, and its sampling / stopping behaviour."""

from __future__ import annotations

import pytest
import torch

from anchorcoder.generation import GenerationEngine, GenerationSettings
from anchorcoder.methods import build_method


def engine_for(loaded, **settings) -> GenerationEngine:
    return GenerationEngine(
        loaded.model, loaded.tokenizer, build_method({"name": "dense"}), GenerationSettings(**settings)
    )


def reference_greedy(loaded, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """model.generate(do_sample=False), left-padded like the engine, cut before the first EOS."""
    tok, model = loaded.tokenizer, loaded.model
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
    )
    eos = model.generation_config.eos_token_id
    cut = []
    for row in out[:, width:].tolist():
        cut.append(row[: row.index(eos)] if eos in row else row)
    return cut


def encode(loaded, texts):
    return [loaded.tokenizer(t).input_ids for t in texts]


@pytest.mark.parametrize(("which", "batch_size"), [("tiny", 1), ("tiny", 3), ("smollm2", 1), ("smollm2", 4)])
def test_greedy_matches_generate(which, batch_size, request, humaneval_prompts):
    """Token for token, batch 1 (each prompt alone) and batched with left padding."""
    loaded = request.getfixturevalue(which)
    prompts = encode(loaded, humaneval_prompts[:4])
    ours = engine_for(loaded, max_new_tokens=24, batch_size=batch_size).generate(prompts)
    if batch_size == 1:
        expected = [reference_greedy(loaded, [p], 24)[0] for p in prompts]
    else:
        expected = reference_greedy(loaded, prompts, 24)
    assert [r.token_ids for r in ours] == expected
    assert all(len(r.token_ids) > 0 for r in ours)


def test_sampling_is_seeded_and_gives_n_samples(tiny, humaneval_prompts):
    prompts = encode(tiny, humaneval_prompts[:2])
    settings = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, n_samples=3, batch_size=4)
    first = engine_for(tiny, **settings, seed=1).generate(prompts)
    again = engine_for(tiny, **settings, seed=1).generate(prompts)
    other = engine_for(tiny, **settings, seed=2).generate(prompts)
    assert [(r.prompt_index, r.sample_index) for r in first] == [(p, s) for p in range(2) for s in range(3)]
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]
    assert len({tuple(r.token_ids) for r in first}) > 2  # samples of one prompt differ
    # each sample has its own stream: alone, in another batch or another process, it draws the same
    alone = engine_for(tiny, **{**settings, "batch_size": 1}, seed=1).generate(prompts, rows=[(1, 2), (0, 1)])
    assert [r.token_ids for r in alone] == [first[5].token_ids, first[1].token_ids]


def test_tiny_top_p_is_greedy(tiny, humaneval_prompts):
    prompts = encode(tiny, humaneval_prompts[:2])
    greedy = engine_for(tiny, max_new_tokens=10).generate(prompts)
    nucleus = engine_for(tiny, max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1e-6).generate(prompts)
    assert [r.token_ids for r in greedy] == [r.token_ids for r in nucleus]


def test_stop_strings_cut_text_and_end_generation(smollm2, humaneval_prompts):
    prompt = encode(smollm2, humaneval_prompts[:1])
    free = engine_for(smollm2, max_new_tokens=60).generate(prompt)[0]
    assert "\n" in free.text
    stop = "\n"
    stopped = engine_for(smollm2, max_new_tokens=60, stop=(stop,)).generate(prompt)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert len(stopped.token_ids) < len(free.token_ids)


def test_eos_ends_a_sample(tiny, humaneval_prompts):
    engine = engine_for(tiny, max_new_tokens=5, stop_at_eos=True)
    prompts = encode(tiny, humaneval_prompts[:1])
    first = engine_for(tiny, max_new_tokens=5).generate(prompts)[0].token_ids[0]
    engine.eos_ids = {first}  # make the model's first greedy token the end of sequence
    result = engine.generate(prompts)[0]
    assert result.finish_reason == "eos" and result.token_ids == []


def test_bad_settings_are_refused():
    from anchorcoder.registry import ConfigError

    with pytest.raises(ConfigError, match="generation.n_samples"):
        GenerationSettings(n_samples=4, do_sample=False)
    with pytest.raises(ConfigError, match="generation.top_p"):
        GenerationSettings(top_p=0)
