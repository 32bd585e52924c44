"""Attention that honours what a :class:`KVCache` holds and what its method lets a query see.

transformers calls the attention function registered under ``config._attn_implementation`` with
our extra keyword ``kv_cache``. We register one function, ``"anchorcoder"``, which builds the mask of
the layer from the cache (absolute positions, padding, the method's visibility rule) and hands it to
the selected kernel (``sdpa`` or ``eager``). The engine switches a model to it only while it runs
(:func:`engine_attention`), so outside the engine the model is a plain transformers model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "anchorcoder"
KERNEL_ATTR = "anchorcoder_kernel"  # config attribute naming the kernel our wrapper calls
KERNELS = ("sdpa", "eager")


def repeat_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention; ``attention_mask`` is boolean (True = visible) or None (= all)."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv_heads(key, groups), repeat_kv_heads(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def packed_decode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0):
    """SDPA for one query per row (decoding) under grouped-query attention, without repeating K/V.

    Each KV head attends with its group of query heads packed as a block of queries: ``[B, H, 1, D]``
    becomes ``[B, H_kv, H / H_kv, D]`` (query head ``j`` uses KV head ``j // groups``, as ``repeat_kv``
    does). On CPU this beats SDPA's ``enable_gqa`` and ``repeat_kv`` alike (README, "Engine speed").
    ``attention_mask`` is boolean ``[B, 1|H_kv|H, 1, S]`` or None.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    if attention_mask is not None and attention_mask.shape[1] == heads:
        attention_mask = attention_mask.reshape(batch, kv_heads, heads // kv_heads, -1)
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=attention_mask, scale=scaling, dropout_p=dropout if module.training else 0.0
    )
    # reshape, not view: some SDPA kernels (CUDA memory-efficient) return [B, G, H_kv, D] transposed
    return out.reshape(batch, 1, heads, dim), None


KEY_BLOCK = 512  # keys per block of key_blocked_attention
KEY_BLOCKED_FROM = 4096  # a prefill chunk after the first, over more cached keys than this, goes by key blocks
EXP_FLOOR = -80.0  # exp(x - max) is taken at >= this: e^-80 ~ 1e-35, while subnormal results make exp ~30x slower


@dataclass(frozen=True)
class KeyBlocks:
    """A boolean mask ``[B, 1|H, Q, S]`` never held whole: ``build(start, end)`` gives its columns for
    keys ``start:end``. What :func:`key_blocked_attention` takes over a long cache, so that the mask,
    like the scores, costs ``Q x block`` at a time (the rules it comes from are per-key vectors)."""

    shape: tuple[int, ...]
    build: Callable[[int, int], torch.Tensor]

    @staticmethod
    def of(mask: torch.Tensor | KeyBlocks) -> KeyBlocks:
        if isinstance(mask, KeyBlocks):
            return mask
        return KeyBlocks(tuple(mask.shape), lambda start, end: mask[..., start:end])

    def after(self, prefix: torch.Tensor | KeyBlocks) -> KeyBlocks:
        """``prefix``'s keys, then these (e.g. extra keys a method puts before the cache's)."""
        first = KeyBlocks.of(prefix)
        split = first.shape[-1]

        def build(start: int, end: int) -> torch.Tensor:
            parts = []
            if start < split:
                parts.append(first.build(start, min(end, split)))
            if end > split:
                parts.append(self.build(max(start, split) - split, end - split))
            if len(parts) == 1:
                return parts[0]
            shape = torch.broadcast_shapes(parts[0].shape[:-1], parts[1].shape[:-1])
            return torch.cat([p.expand(*shape, p.shape[-1]) for p in parts], dim=-1)

        heads = self.shape[1] if first.shape[1] == 1 else first.shape[1]
        return KeyBlocks((*self.shape[:1], heads, *self.shape[2:-1], split + self.shape[-1]), build)


def key_blocked_attention(query, key, value, mask, scaling, block: int = KEY_BLOCK):
    """Softmax attention over the keys in blocks of ``block``, with a running maximum and sum per
    query (FlashAttention's online softmax), so a prefill chunk of ``Q`` queries over ``S`` cached
    keys never holds its ``[B, H, Q, S]`` scores, nor the float copy of the boolean mask that SDPA
    makes: the working set is ``Q x block`` per head, whatever the cache's length. Grouped-query
    heads attend in groups, without repeating K/V; bf16/fp16 accumulate in fp32. ``mask``: boolean
    ``[B, 1|H_kv|H, Q, S]``, True = visible, or :class:`KeyBlocks` of that shape. Returns
    ``[B, Q, H, D]``, as the kernels do.
    """
    mask = KeyBlocks.of(mask)
    batch, heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.reshape(batch, kv_heads, groups, q_len, dim).to(dtype) * (scaling or dim**-0.5)
    lowest = torch.finfo(dtype).min
    best = torch.full((batch, kv_heads, groups, q_len, 1), lowest, dtype=dtype, device=query.device)
    total = torch.zeros_like(best)
    out = torch.zeros(batch, kv_heads, groups, q_len, value.shape[-1], dtype=dtype, device=query.device)
    for start in range(0, length, block):
        k = key[:, :, None, start : start + block].to(dtype)
        v = value[:, :, None, start : start + block].to(dtype)
        visible = mask.build(start, min(start + block, length)).to(query.device)
        # [B, H_kv, groups, Q, keys] when per query head, else [B, 1|H_kv, 1, Q, keys]
        layout = (kv_heads, groups) if visible.shape[1] == heads else (visible.shape[1], 1)
        hidden = visible.reshape(visible.shape[0], *layout, q_len, -1).logical_not()
        bias = torch.zeros(hidden.shape, dtype=dtype, device=query.device).masked_fill_(hidden, lowest)
        scores = (q @ k.transpose(-1, -2)).add_(bias)
        new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
        rescale = torch.exp(best - new_best)
        weights = scores.sub_(new_best).clamp_(min=EXP_FLOOR).exp_()
        total = total * rescale + weights.sum(-1, keepdim=True)
        out = out * rescale + weights @ v
        best = new_best
    out = (out / total).to(query.dtype).reshape(batch, heads, q_len, -1)
    return out.transpose(1, 2).contiguous()


TRAINING_CHUNK = 512  # query rows per block in a full-sequence masked forward
_CAUSAL_MASKS = ContextVar("anchorcoder_causal_masks", default=False)


@contextmanager
def causal_masks():
    """Declare that full-sequence boolean masks in this block are causal (training masks), so
    :func:`causal_blocks_attention` may skip the keys above the diagonal."""
    token = _CAUSAL_MASKS.set(True)
    try:
        yield
    finally:
        _CAUSAL_MASKS.reset(token)


def causal_blocks_attention(kernel, module, query, key, value, mask, chunk: int | None = None, **kwargs):
    """A full-sequence forward under a causal boolean mask ``[B, 1|H, T, P + T]``, in blocks of ``chunk``
    query rows, each against only the keys up to its last row. The first ``P`` keys (extra keys a
    method put before the sequence, e.g. AnchorCoder's layer-wise anchors) go to every block.

    SDPA skips the upper triangle only with ``is_causal`` and no mask; given a mask it computes all
    T x T scores. Blocking the queries skips all but the diagonal blocks' upper parts: at 4,096 tokens
    and 512-row blocks the attention work drops to 9/16 of the full square (README, "AnLLM").
    """
    length, chunk = query.shape[2], chunk or TRAINING_CHUNK
    prefix = key.shape[2] - length
    if length <= chunk:
        return kernel(module, query, key, value, mask, **kwargs)
    outs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length) + prefix
        out, _ = kernel(
            module, query[:, :, start : start + chunk], key[:, :, :end], value[:, :, :end],
            mask[:, :, start : start + chunk, :end], **kwargs,
        )  # fmt: skip
        outs.append(out)
    return torch.cat(outs, dim=1), None


def _kernel(module):
    return eager_attention if getattr(module.config, KERNEL_ATTR, "sdpa") == "eager" else sdpa_attention_forward


def cached_attention(
    module, query, key, value, attention_mask, dropout=0.0, kv_cache=None, kv_method=None, kv_tokens=None, **kwargs
):
    # dropout may come positionally: wrappers such as kvpress' attention patch pass it so
    out, weights = _attend(module, query, key, value, attention_mask, dropout, kv_cache, kv_method, kv_tokens, **kwargs)
    source = kv_cache if kv_cache is not None else kv_tokens
    if source is not None and kv_method is not None and kv_method.reshapes_attention:
        out = kv_method.adapt_output(module, out, source, kwargs.get("scaling") or query.shape[-1] ** -0.5)
    return out, weights


def _attend(module, query, key, value, attention_mask, dropout, kv_cache, kv_method, kv_tokens, **kwargs):
    """:func:`cached_attention` up to the kernel's output."""
    kernel = _kernel(module)
    if kv_cache is None:  # a plain forward: behave like the kernel itself
        if kv_tokens is not None:  # a training forward of a method that reshapes attention
            query, key, value, attention_mask = kv_method.adapt_attention(
                module, query, key, value, attention_mask, kv_tokens
            )
        if _CAUSAL_MASKS.get() and isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            if key.shape[2] >= query.shape[2]:  # a full sequence under a causal training mask
                return causal_blocks_attention(
                    kernel, module, query, key, value, attention_mask, dropout=dropout, **kwargs
                )
        return kernel(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    layer = module.layer_idx
    q_len, kv_len = query.shape[2], key.shape[2]
    by_blocks = 1 < q_len < kv_len and kv_len > KEY_BLOCKED_FROM and kernel is sdpa_attention_forward
    extra = None if by_blocks or kv_method is None else kv_method.visibility(kv_cache, layer)
    plain_causal = not kv_cache.has_padding and extra is None and (q_len == 1 or q_len == kv_len)
    if by_blocks:  # a chunk over a long cache: mask and scores a block of keys at a time
        mask = _key_blocks(kv_cache, kv_method, layer, q_len, kv_len)
    elif plain_causal and (kernel is sdpa_attention_forward or q_len == 1):
        mask = None  # sdpa: is_causal when q_len > 1; one query sees every cached entry
    else:
        mask = kv_cache.base_mask(layer)
        if extra is not None:
            mask = kv_cache.step_memo(("visible", mask, extra), lambda: mask & extra)
    if isinstance(mask, torch.Tensor):  # masks follow the cache's positions: the engine's device
        mask = mask.to(query.device)  # (a no-op unless the layer sits elsewhere: model.device_map)
    if kv_method is not None and kv_method.reshapes_attention:
        query, key, value, mask = kv_method.adapt_attention(module, query, key, value, mask, kv_cache)
    if kernel is sdpa_attention_forward and q_len == 1 and query.shape[1] > key.shape[1]:
        return packed_decode_attention(module, query, key, value, mask, kwargs.get("scaling"), dropout)
    if by_blocks:
        return key_blocked_attention(query, key, value, mask, kwargs.get("scaling")), None
    if mask is not None and mask.shape[1] not in (1, query.shape[1]):  # per-KV-head mask -> per query head
        mask = repeat_kv_heads(mask, query.shape[1] // mask.shape[1])
    return kernel(module, query, key, value, mask, dropout=dropout, **kwargs)


def _key_blocks(kv_cache, kv_method, layer: int, q_len: int, kv_len: int) -> KeyBlocks:
    """The cache's mask and the method's visibility, built a block of keys at a time."""
    batch = kv_cache.step_positions.shape[0]
    heads = kv_cache.positions[layer].shape[1] if kv_cache.positions[layer].dim() == 3 else 1

    def build(start: int, end: int) -> torch.Tensor:
        keys = slice(start, end)
        mask = kv_cache.base_mask(layer, keys)
        extra = kv_method.visibility(kv_cache, layer, keys) if kv_method is not None else None
        return mask if extra is None else mask & extra

    return KeyBlocks((batch, heads, q_len, kv_len), build)


AttentionInterface.register(ATTENTION_NAME, cached_attention)


@contextmanager
def engine_attention(model):
    """Route the model's attention through :func:`cached_attention` for the duration."""
    previous = model.config._attn_implementation
    if previous == ATTENTION_NAME:
        yield
        return
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def set_kernel(model, kernel: str) -> None:
    """Select the attention kernel for plain forwards and for the engine's wrapper."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got '{kernel}'")
    setattr(model.config, KERNEL_ATTR, kernel)
    if kernel == "sdpa":
        model.set_attn_implementation("sdpa")
    else:
        model.set_attn_implementation("eager")
