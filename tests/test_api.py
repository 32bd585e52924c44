"""The library face, driven as a notebook would: load once, generate under two methods, evaluate."""

from __future__ import annotations

import json

import pytest

import anchorcoder
from anchorcoder.registry import ConfigError

PROMPTS = ["def add(a, b):\n", '"""A stack. It holds items."""\nclass Stack:\n    def push(self, x):\n']


@pytest.fixture(scope="module")
def model():
    return anchorcoder.load("model=tiny-llama", device="cpu")


def test_generate_under_two_methods_on_one_loaded_model(model):
    settings = ["generation.max_new_tokens=12", "+generation.stop_at_eos=false"]
    dense = anchorcoder.generate(model, PROMPTS, *settings)
    evicted = anchorcoder.generate(
        model, PROMPTS, "method=streamingllm", "method.max_tokens=8", "method.schedule=every_step", *settings
    )
    assert [len(r.token_ids) for r in dense] == [12, 12] and [r.prompt_index for r in dense] == [0, 1]
    for d, e in zip(dense, evicted, strict=True):
        assert e.prompt_token_ids == d.prompt_token_ids  # the same encoding rule for both methods
        assert d.kv.bytes_final == d.kv.dense_bytes_final  # dense holds everything
        assert e.kv.bytes_final < d.kv.bytes_final and e.kv.dense_bytes_final == d.kv.dense_bytes_final


def test_a_method_that_adds_tokens_leaves_other_methods_prompts_unchanged(model):
    """prepare() adds AnLLM's <AC> to the shared model and tokenizer; dense encodes as before (and, on
    this model, generates the same tokens: the new row is not sampled here, which the docstring does
    not promise in general)."""
    settings = ["generation.max_new_tokens=10", "+generation.stop_at_eos=false"]
    before = anchorcoder.generate(model, PROMPTS, *settings)
    anchored = anchorcoder.generate(model, PROMPTS, "method=anllm", "method.variant=ac", *settings)
    assert "<AC>" in model.tokenizer.get_vocab()
    assert any(len(r.prompt_token_ids) > len(b.prompt_token_ids) for r, b in zip(anchored, before, strict=True))
    after = anchorcoder.generate(model, PROMPTS, *settings)
    assert [r.token_ids for r in after] == [r.token_ids for r in before]
    assert [r.prompt_token_ids for r in after] == [r.prompt_token_ids for r in before]


def test_evaluate_is_an_eval_run_on_the_loaded_model(model, tmp_path):
    metrics = anchorcoder.evaluate(
        "method=streamingllm",
        "method.compression_ratio=0.5",
        "benchmark.limit=2",
        "generation.max_new_tokens=8",
        "logger=none",
        model=model,
        output_dir=tmp_path,
    )
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["quality/problems"] == 2 and 0 < metrics["kv/reduction_final"] < 1
    saved = (tmp_path / "config.yaml").read_text()
    assert "name: tiny-llama" in saved and "name: streamingllm" in saved  # the loaded model's config


def test_bad_overrides_are_refused_before_generating(model):
    with pytest.raises(ConfigError, match="compression_ratio"):
        anchorcoder.generate(model, PROMPTS, "method=l2norm", "method.compression_ratio=2")
    with pytest.raises(ConfigError, match="style"):
        anchorcoder.generate(model, PROMPTS, style="poetry")
    with pytest.raises(ConfigError, match="drop model.dtype=float16"):
        anchorcoder.evaluate("model.dtype=float16", model=model)
