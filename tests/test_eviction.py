"""Training-free eviction (l2norm, streamingllm) and the kvpress bridge: selection, memory, positions, parity."""

from __future__ import annotations

import gc
import importlib.util
import math
import weakref
from dataclasses import dataclass

import pytest
import torch
from conftest import compose_config

from anchorcoder.generation import GenerationEngine, GenerationSettings, KVCache
from anchorcoder.generation.attention import engine_attention
from anchorcoder.generation.engine import forward_with_cache
from anchorcoder.methods import StepInfo, build_method
from anchorcoder.methods.eviction import L2Norm, kept_count
from anchorcoder.registry import ConfigError


@pytest.fixture(scope="module")
def tiny4():
    """The tiny GQA Llama with 4 layers, so that some layers are skipped and some compressed."""
    from anchorcoder.models import load_model

    cfg = compose_config(overrides=["model=tiny-llama", "model.architecture.num_hidden_layers=4"])["model"]
    return load_model(cfg, device="cpu")


def filled_cache(keys: torch.Tensor, positions: torch.Tensor) -> KVCache:
    """A one-layer cache holding ``keys`` (also used as values) at ``positions`` ``[B, S]``."""
    cache = KVCache(1, keys.shape[1], keys.shape[-1])
    cache.begin_step(positions)
    cache.update(keys, keys.clone(), 0)
    return cache


def prefill(loaded, method, ids: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[KVCache, torch.Tensor]:
    """One prefill through the engine's forward, then the method's after_step; returns (cache, last logits)."""
    num_layers, kv_heads, head_dim = (
        loaded.model.config.num_hidden_layers,
        loaded.model.config.num_key_value_heads,
        loaded.model.config.head_dim,
    )
    cache = KVCache(num_layers, kv_heads, head_dim)
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1) if positions is None else positions
    with engine_attention(loaded.model), torch.inference_mode():
        out = forward_with_cache(loaded.model, cache, method, ids, positions)
        method.after_step(cache, StepInfo(ids, positions, "prefill"))
    return cache, out.logits[:, -1]


def held_positions(cache: KVCache, layer: int) -> torch.Tensor:
    pos = cache.positions[layer]
    return pos if pos.dim() == 3 else pos[:, None, :].expand(-1, cache.num_kv_heads, -1)


# ---------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("rounding", ["ceil", "floor"])
def test_kept_set_equals_a_brute_force_sort_of_the_norms(rounding):
    torch.manual_seed(0)
    batch, heads, length, dim, ratio = 3, 2, 37, 8, 0.6
    keys = torch.randn(batch, heads, length, dim) * torch.rand(batch, heads, length, 1) * 3
    pad = [0, 5, 11]  # left padding per row
    positions = torch.stack([torch.cat([torch.full((p,), -1), torch.arange(length - p)]) for p in pad])
    cache = filled_cache(keys.clone(), positions)
    before = weakref.ref(cache.keys[0])
    method = L2Norm(compression_ratio=ratio, skip_layers=[], rounding=rounding)
    method.after_step(cache, StepInfo(torch.zeros_like(positions), positions, "prefill"))
    gc.collect()
    assert before() is None  # the full tensor is gone: nothing keeps it alive
    kept_slots = cache.keys[0].shape[2] + cache.growth  # a new, small allocation: what is kept + growth slots
    assert cache.keys[0].untyped_storage().nbytes() == batch * heads * kept_slots * dim * 4
    assert cache.keys[0].shape[1] == heads  # KV heads unchanged (no repetition)
    kept = held_positions(cache, 0)
    for b in range(batch):
        real = length - pad[b]
        n_keep = math.ceil((1 - ratio) * real) if rounding == "ceil" else max(1, int(real * (1 - ratio)))
        for h in range(heads):
            norms = keys[b, h, pad[b] :].norm(dim=-1)
            expected = sorted(norms.argsort()[:n_keep].tolist())  # positions of the lowest norms
            got = [p for p in kept[b, h].tolist() if p >= 0]
            assert got == expected
            assert got == sorted(set(got))  # positional order, no duplicates
        stored = cache.keys[0][b]  # the stored keys are those of the kept positions
        for h in range(heads):
            for slot, p in enumerate(kept[b, h].tolist()):
                if p >= 0:
                    assert torch.equal(stored[h, slot], keys[b, h, pad[b] + p])


def test_rounding_matches_l2compress_ceil_and_kvpress_floor():
    # S = 1000, keep_ratio 0.98 (l2compress' default) and compression 0.98 (kept 2%)
    for ratio in (0.02, 0.98):
        seen = torch.tensor([1000])
        assert kept_count(seen, ratio, "ceil").item() == math.ceil((1 - ratio) * 1000)
        assert kept_count(seen, ratio, "floor").item() == max(1, int(1000 * (1 - ratio)))
    assert kept_count(torch.tensor([1000]), 0.02, "ceil").item() == 980
    assert kept_count(torch.tensor([1000]), 0.98, "floor").item() == 20
    # and everywhere else, bit for bit with each library's own Python expression
    seen = torch.arange(1, 2001)
    for ratio in (0.02, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 0.98):
        ceil_ours = kept_count(seen, ratio, "ceil").tolist()
        floor_ours = kept_count(seen, ratio, "floor").tolist()
        assert ceil_ours == [math.ceil((1 - ratio) * s) for s in range(1, 2001)]
        assert floor_ours == [max(1, int(s * (1 - ratio))) for s in range(1, 2001)]
    assert kept_count(torch.tensor([1001]), 0.02, "ceil").item() == 981  # where the two differ
    assert kept_count(torch.tensor([1001]), 0.02, "floor").item() == 980


@pytest.mark.parametrize("keep", ["low_norm", "high_norm"])
def test_protected_sink_and_recent_positions_are_always_kept(keep):
    torch.manual_seed(1)
    keys = torch.randn(2, 2, 50, 8)
    keys[:, :, :3] *= 100  # the sinks have the largest norms: l2norm alone would evict them
    keys[:, :, -4:] *= 100
    positions = torch.arange(50)[None].expand(2, -1)
    cache = filled_cache(keys, positions)
    method = L2Norm(compression_ratio=0.9, skip_layers=[], protect_sink=3, protect_recent=4, keep=keep)
    method.after_step(cache, StepInfo(torch.zeros_like(positions), positions, "prefill"))
    kept = held_positions(cache, 0)
    assert kept.shape[-1] == 7  # ceil(0.1 * 50) = 5 < 3 + 4 protected: the budget grows to hold them
    for row in kept.reshape(-1, kept.shape[-1]).tolist():
        assert {0, 1, 2, 46, 47, 48, 49} <= set(row)


def test_streamingllm_keeps_sinks_and_the_recent_window():
    keys = torch.randn(1, 2, 40, 8)
    positions = torch.arange(40)[None]
    cache = filled_cache(keys, positions)
    method = build_method({"name": "streamingllm", "compression_ratio": 0.75, "protect_sink": 4})
    method.after_step(cache, StepInfo(torch.zeros_like(positions), positions, "prefill"))
    assert cache.positions[0].tolist() == [[0, 1, 2, 3, 34, 35, 36, 37, 38, 39]]  # ceil(0.25 * 40) = 10


# ---------------------------------------------------------------------------------------- on a model
def test_skipped_layers_stay_bit_identical_and_others_shrink(tiny4):
    ids = torch.randint(5, 1000, (1, 40), generator=torch.Generator().manual_seed(2))
    dense, dense_logits = prefill(tiny4, build_method({"name": "dense"}), ids)
    method = build_method({"name": "l2norm", "skip_layers": [0, 2], "compression_ratio": 0.5})
    method.prepare(tiny4.model, tiny4.tokenizer)
    pruned, logits = prefill(tiny4, method, ids)
    assert torch.equal(logits, dense_logits)  # the prompt's own forward saw everything
    for layer in (0, 2):
        assert torch.equal(pruned.keys[layer], dense.keys[layer])
        assert torch.equal(pruned.values[layer], dense.values[layer])
        assert torch.equal(pruned.positions[layer], dense.positions[layer])
    for layer in (1, 3):
        assert pruned.keys[layer].shape == (1, 2, 20, dense.head_dim)  # GQA: still 2 KV heads


def test_ratio_zero_gives_logits_identical_to_dense(tiny4, humaneval_prompts):
    prompt = tiny4.tokenizer(humaneval_prompts[0]).input_ids
    runs = {}
    for cfg in (
        {"name": "dense"},
        {"name": "l2norm", "compression_ratio": 0.0, "skip_layers": [], "schedule": "every_step"},
    ):
        method = build_method(cfg)
        method.prepare(tiny4.model, tiny4.tokenizer)
        engine = GenerationEngine(
            tiny4.model, tiny4.tokenizer, method, GenerationSettings(max_new_tokens=10, stop_at_eos=False)
        )
        target = list(range(100, 110))
        runs[cfg["name"]] = engine.generate([prompt], targets=[target])[0]
    assert runs["l2norm"].nll == runs["dense"].nll
    assert runs["l2norm"].kv == runs["dense"].kv


@dataclass
class MaskEvicted(L2Norm):
    """Reference for the equivalence test: select as l2norm does, but only hide the entries (no deletion)."""

    def __post_init__(self):
        super().__post_init__()
        self.hidden: dict[int, torch.Tensor] = {}

    def evict(self, cache, layer, seen, budget, slack=0):
        pos = cache.positions[layer][:, None, :]
        index = self.select(cache.keys[layer], pos, seen, budget)
        visible = torch.zeros(pos.shape[0], cache.num_kv_heads, pos.shape[-1], dtype=torch.bool)
        visible.scatter_(-1, index.expand(-1, cache.num_kv_heads, -1) if index.shape[1] == 1 else index, True)
        self.hidden[layer] = ~visible

    def visibility(self, cache, layer_idx):
        if layer_idx not in self.hidden:
            return None
        hidden = self.hidden[layer_idx]
        new = cache.layer_length(layer_idx) - hidden.shape[-1]
        hidden = torch.cat([hidden, hidden.new_zeros(*hidden.shape[:2], new)], -1)
        return ~hidden[:, :, None, :]


@pytest.mark.parametrize("which", ["tiny4", "smollm2"])
def test_real_deletion_equals_masking_the_evicted_entries(which, request, humaneval_prompts):
    """Deleting entries (per KV head, absolute positions) == attending over the full cache with them hidden."""
    loaded = request.getfixturevalue(which)
    prompt = loaded.tokenizer(humaneval_prompts[3]).input_ids
    target = loaded.tokenizer("    return sorted(set(numbers))[:3]\n").input_ids
    settings = GenerationSettings(max_new_tokens=len(target), stop_at_eos=False)
    options = {"compression_ratio": 0.6, "skip_layers": [0]}
    nll = {}
    for name, method in (("deleted", L2Norm(**options)), ("masked", MaskEvicted(**options))):
        result = GenerationEngine(loaded.model, loaded.tokenizer, method, settings).generate(
            [prompt], targets=[target]
        )[0]
        nll[name] = (result.nll, result.kv.entries_final)
    assert abs(nll["deleted"][0] - nll["masked"][0]) < 1e-4 * len(target)
    assert nll["deleted"][1] < nll["masked"][1]  # only one of them really freed memory


def test_kept_cache_order_does_not_change_the_next_logits(tiny4):
    ids = torch.randint(5, 1000, (1, 41), generator=torch.Generator().manual_seed(3))
    method = L2Norm(compression_ratio=0.5, skip_layers=[])
    outs = []
    for permute in (False, True):
        cache, _ = prefill(tiny4, method, ids[:, :40])
        if permute:
            for layer in range(cache.num_layers):
                n = cache.layer_length(layer)
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(layer))
                cache.keep(layer, perm[None, None, :].expand(1, cache.num_kv_heads, -1))
        with engine_attention(tiny4.model), torch.inference_mode():
            outs.append(
                forward_with_cache(
                    tiny4.model, cache, method, ids[:, 40:], torch.tensor([[40]]), phase="decode"
                ).logits[0, -1]
            )
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_every_step_schedule_holds_the_cap(tiny4, humaneval_prompts):
    prompt = tiny4.tokenizer(humaneval_prompts[5]).input_ids
    cap, slack = 30, 5
    method = build_method(
        {"name": "l2norm", "schedule": "every_step", "max_tokens": cap, "decode_slack": slack, "skip_layers": [0]}
    )
    seen_lengths = []

    class Probe(type(method)):
        def after_step(self, cache, step):
            super().after_step(cache, step)
            seen_lengths.append([cache.layer_length(layer) for layer in range(cache.num_layers)])

    probe = Probe(**{k: getattr(method, k) for k in method.describe() if k != "name"})
    engine = GenerationEngine(
        tiny4.model, tiny4.tokenizer, probe, GenerationSettings(max_new_tokens=20, stop_at_eos=False)
    )
    result = engine.generate([prompt])[0]
    assert seen_lengths[0][1:] == [cap] * 3  # the prompt was cut to the cap at once
    for lengths in seen_lengths:
        assert all(cap <= n <= cap + slack for n in lengths[1:])  # compressed layers stay within cap + slack
    assert seen_lengths[-1][0] == len(prompt) + 19  # layer 0 skipped: it holds everything
    assert result.kv.entries_final == 2 * (seen_lengths[-1][0] + sum(seen_lengths[-1][1:]))


def test_measured_bytes_shrink_by_the_effective_ratio(smollm2, humaneval_prompts):
    """All layers counted, skipped ones included: within one token per layer of the effective ratio."""
    model = smollm2.model
    cfg = model.config
    prompt = smollm2.tokenizer(humaneval_prompts[7]).input_ids
    new_tokens, ratio, skip = 8, 0.5, [0, 1]
    results = {}
    for name, extra in (("dense", {}), ("l2norm", {"compression_ratio": ratio, "skip_layers": skip})):
        method = build_method({"name": name, **extra})
        method.prepare(model, smollm2.tokenizer)
        engine = GenerationEngine(
            model, smollm2.tokenizer, method, GenerationSettings(max_new_tokens=new_tokens, stop_at_eos=False)
        )
        results[name] = (engine.generate([prompt])[0].kv, engine.stats.kv_tensor_bytes_peak)
    dense, pruned = results["dense"][0], results["l2norm"][0]
    layers, heads, held = cfg.num_hidden_layers, cfg.num_key_value_heads, len(prompt) + new_tokens - 1
    effective_keep = (len(skip) + (layers - len(skip)) * (1 - ratio)) / layers  # 0.533 for 2 of 30 skipped
    per_entry = 2 * cfg.head_dim * 4  # K and V, float32
    expected_bytes = (
        effective_keep * len(prompt) * layers * heads * per_entry + (new_tokens - 1) * layers * heads * per_entry
    )
    assert dense.bytes_final == held * layers * heads * per_entry
    assert abs(pruned.bytes_final - expected_bytes) <= layers * heads * per_entry  # one token per layer
    assert pruned.bytes_peak == len(prompt) * layers * heads * per_entry  # the full prompt existed before eviction
    print(
        f"\nprompt {len(prompt)} tokens: dense {dense.bytes_final:,} B, l2norm 0.5 {pruned.bytes_final:,} B "
        f"(kept {pruned.bytes_final / dense.bytes_final:.3f}; effective keep {effective_keep:.3f} of the prompt)"
    )


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["l2norm", "streamingllm", "kvpress"])
def test_method_configs_compose_and_build(name):
    cfg = compose_config(overrides=[f"method={name}"])
    if name == "kvpress" and importlib.util.find_spec("kvpress") is None:
        with pytest.raises(ConfigError, match="make install-kvpress"):  # before any model is loaded
            build_method(cfg["method"])
        return
    assert build_method(cfg["method"]).describe()["name"] == name


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"compression_ratio": 1.0}, "compression_ratio"),
        ({"schedule": "sometimes"}, "after_prefill, every_step"),
        ({"rounding": "round"}, "ceil, floor"),
        ({"keep": "median"}, "low_norm, high_norm, random"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"budget": 3}, "valid:"),
    ],
)
def test_bad_method_options_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_method({"name": "l2norm", **override})


def test_skip_layer_outside_the_model_is_refused(tiny4):
    method = build_method({"name": "l2norm", "skip_layers": [0, 7]})
    with pytest.raises(ConfigError, match=r"method.skip_layers has \[7\].*0..3"):
        method.prepare(tiny4.model, tiny4.tokenizer)


def test_a_method_that_cannot_see_padding_needs_batch_size_one(tiny4):
    from anchorcoder.methods import KVMethod
    from anchorcoder.methods.kvpress_bridge import KVPressBridge

    assert KVPressBridge.handles_padding is False

    class Unpadded(KVMethod):
        name = "unpadded"
        handles_padding = False

    with pytest.raises(ConfigError, match="generation.batch_size=1"):
        GenerationEngine(tiny4.model, tiny4.tokenizer, Unpadded(), GenerationSettings(batch_size=4))
    GenerationEngine(tiny4.model, tiny4.tokenizer, Unpadded(), GenerationSettings(batch_size=1))


# ---------------------------------------------------------------------------------------- kvpress parity
def kvpress_kept_indices(model, ids: torch.Tensor, press) -> list[torch.Tensor]:
    """Run kvpress' own hook on a plain transformers forward; locate the kept entries per layer."""
    from transformers import DynamicCache

    from anchorcoder.methods.kvpress_bridge import kept_index

    with torch.inference_mode():
        full = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=full)
        pressed = DynamicCache(config=model.config)
        with press(model):
            model(input_ids=ids, past_key_values=pressed)
    return [
        kept_index(full.layers[i].keys, full.layers[i].values, pressed.layers[i].keys, pressed.layers[i].values)
        for i in range(model.config.num_hidden_layers)
    ]


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_l2norm_with_kvpress_settings_keeps_what_knormpress_keeps(smollm2, humaneval_prompts, ratio):
    kvpress = pytest.importorskip("kvpress")
    model = smollm2.model
    ids = torch.tensor([smollm2.tokenizer(humaneval_prompts[0] + humaneval_prompts[1]).input_ids])
    theirs = kvpress_kept_indices(model, ids, kvpress.KnormPress(compression_ratio=ratio))
    ours_method = build_method({"name": "l2norm", "compression_ratio": ratio, "skip_layers": [], "rounding": "floor"})
    ours, _ = prefill(smollm2, ours_method, ids)
    ours_dense_keys = prefill(smollm2, build_method({"name": "dense"}), ids)[0].keys
    bridge = build_method({"name": "kvpress", "press": "knorm", "compression_ratio": ratio})
    bridge.prepare(model, smollm2.tokenizer)
    bridged, _ = prefill(smollm2, bridge, ids)
    heads = equal = ties = 0
    for layer, index in enumerate(theirs):
        mine, via_bridge = held_positions(ours, layer), held_positions(bridged, layer)
        norms = torch.linalg.vector_norm(ours_dense_keys[layer], dim=-1, dtype=torch.float32)
        for h in range(index.shape[1]):
            heads += 1
            assert torch.equal(via_bridge[0, h], index[0, h])  # the bridge runs kvpress' own selection
            if torch.equal(mine[0, h], index[0, h]):
                equal += 1
                continue
            # torch.topk breaks exact ties in its own way, we keep the earlier position: any
            # difference must be between entries whose norm is exactly the boundary norm
            boundary = norms[0, h].sort().values[index.shape[-1] - 1]
            differ = set(mine[0, h].tolist()) ^ set(index[0, h].tolist())
            assert all(norms[0, h, p] == boundary for p in differ), (layer, h, differ)
            ties += 1
    print(
        f"\nKnormPress({ratio}) vs l2norm(floor, no skipped layers) on SmolLM2, {ids.shape[1]} tokens, "
        f"{index.shape[-1]} kept: {equal}/{heads} (layer, KV head) kept sets identical, "
        f"{ties} differ only in how an exact tie of norms is broken"
    )
    assert equal + ties == heads
