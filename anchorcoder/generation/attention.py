"""Attention that honours what a :class:`KVCache` holds and what its method lets a query see.

transformers calls the attention function registered under ``config._attn_implementation`` with
our extra keyword ``kv_cache``. We register one function, ``"anchorcoder"``, which builds the mask of
the layer from the cache (absolute positions, padding, the method's visibility rule) and hands it to
the selected kernel (``sdpa`` or ``eager``). The engine switches a model to it only while it runs
(:func:`engine_attention`), so outside the engine the model is a plain transformers model.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

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
    extra = kv_method.visibility(kv_cache, layer) if kv_method is not None else None
    plain_causal = not kv_cache.has_padding and extra is None and (q_len == 1 or q_len == kv_len)
    if plain_causal and (kernel is sdpa_attention_forward or q_len == 1):
        mask = None  # sdpa: is_causal when q_len > 1; one query sees every cached entry
    else:
        mask = kv_cache.base_mask(layer)
        if extra is not None:
            mask = mask & extra
    if kv_method is not None and kv_method.reshapes_attention:
        query, key, value, mask = kv_method.adapt_attention(module, query, key, value, mask, kv_cache)
    if kernel is sdpa_attention_forward and q_len == 1 and query.shape[1] > key.shape[1]:
        return packed_decode_attention(module, query, key, value, mask, kwargs.get("scaling"), dropout)
    if mask is not None and mask.shape[1] not in (1, query.shape[1]):  # per-KV-head mask -> per query head
        mask = repeat_kv_heads(mask, query.shape[1] // mask.shape[1])
    return kernel(module, query, key, value, mask, dropout=dropout, **kwargs)


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
