"""Anchor-token methods: segments closed by anchors, cache = past anchors + the open segment.

Shared by AnLLM (Pang et al., Findings of ACL 2024, "Anchor-based Large Language Models": sentence
anchors) and AnchorCoder (Zhang et al. 2024: line anchors). One visibility rule serves both faces:

- ``seg(i)`` = anchors strictly before ``i`` (an anchor belongs to the segment it closes);
- a non-anchor query sees its own segment and every earlier anchor; an anchor query sees only its own
  segment (causally, itself included); the first ``sink_tokens`` positions are visible to all.

**Training face**: :meth:`AnchorMethod.encode` (anchor insertion), :meth:`AnchorMethod.training_batch`
(ids, absolute positions, labels, padding), :meth:`AnchorMethod.attention_mask` (boolean
``[B, 1, T, T]`` for SDPA, built by broadcasting segment ids, no loop over token pairs) and
:meth:`AnchorMethod.block_mask` (the same rule as a FlexAttention ``mask_mod``); :func:`masked_forward`
runs a model under it with whichever attention the model uses.

**Inference face**: :meth:`AnchorMethod.before_step` tracks each fed token's segment and anchor flag;
:meth:`AnchorMethod.visibility` hides what the rule hides (only needed when the step feeds an anchor:
otherwise the pruned cache holds exactly what the query may see); :meth:`AnchorMethod.after_step`
keeps ``{sinks} ∪ {anchors} ∪ {tokens after the last anchor}`` in every layer with real deletion.
Rows of a batch prune differently: shorter rows are left-filled with padding entries.

The invariant (tests): one masked forward gives the logits of incremental decoding with deletion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from anchorcoder.generation.cache import append_along
from anchorcoder.methods.base import KVMethod, StepInfo
from anchorcoder.registry import ConfigError

if TYPE_CHECKING:  # the engine imports the method contract; avoid the cycle
    from anchorcoder.generation.cache import KVCache

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels that take no loss (padding)
OPEN_SEGMENT, KEY_SEGMENT, KEY_ANCHOR, STEP = "anchor/open", "anchor/key_seg", "anchor/key_anchor", "anchor/step"
STORE = "/store"  # suffix: the allocation (with free slots) of which KEY_SEGMENT / KEY_ANCHOR are leading views
SINK = "anchor/sink"  # [B] per row: positions below it are kept and seen by all (sinks, or the whole prompt)


def segment_ids(is_anchor: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Segment of every token ``[B, T]``: ``start`` + anchors strictly before it in the row."""
    a = is_anchor.long()
    start = start[:, None] if isinstance(start, torch.Tensor) else start
    return start + a.cumsum(-1) - a


def real_tokens(
    input_ids: torch.Tensor, padding_mask: torch.Tensor | None, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(real ``[B, T]`` bool, absolute position of every real token with ``-1`` for padding).

    ``doc_ids`` ``[B, T]`` (packed rows): positions restart at 0 where the document id changes."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask.bool()
    pos = real.long().cumsum(-1) - 1
    if doc_ids is not None:
        index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        starts = torch.ones_like(real)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        pos = index - torch.cummax(index * starts, dim=-1).values
    return real, pos.masked_fill(~real, -1)


def earlier_anchors(q_seg, q_anchor, k_seg, k_anchor, anchors_see_anchors: bool = False) -> torch.Tensor:
    """Keys that are anchors of earlier segments, where the query may see them: non-anchor queries
    (every query with ``anchors_see_anchors``). Broadcasts like :func:`anchor_rule`."""
    visible = torch.logical_and(k_anchor, k_seg < q_seg)
    return visible if anchors_see_anchors else visible.logical_and_(~q_anchor)


def anchor_rule(q_seg, q_anchor, k_seg, k_anchor, k_pos, sink=0, anchors_see_anchors: bool = False):
    """Who may see whom, causality and padding aside; arguments broadcast (queries ``[..., Q, 1]``,
    keys ``[..., 1, S]``). ``sink``: positions below it are visible to all (an int, or a tensor that
    broadcasts against ``k_pos``, e.g. per-row prompt lengths)."""
    visible = earlier_anchors(q_seg, q_anchor, k_seg, k_anchor, anchors_see_anchors)  # full shape: ors in place
    visible |= q_seg == k_seg
    if isinstance(sink, torch.Tensor) or sink:
        visible |= (k_pos >= 0) & (k_pos < sink)
    return visible


@dataclass
class TrainingTokens:
    """The rule's view of every token of a full-sequence (training) forward, ``[B, T]`` each."""

    real: torch.Tensor
    anchor: torch.Tensor
    seg: torch.Tensor
    pos: torch.Tensor  # absolute position, -1 = padding
    sink: torch.Tensor  # [B]: positions below it are seen by all
    doc: torch.Tensor | None = None  # packed rows: document of every token; nothing crosses documents
    layer_kv: dict = field(default_factory=dict)  # layer -> (keys, values) as its attention saw them
    memo: dict = field(default_factory=dict)  # per-forward work shared by the layers


@dataclass
class AnchorMethod(KVMethod):
    """Base of the anchor methods: a subclass says which tokens are anchors (and may insert some)."""

    name: ClassVar[str] = "anchor_base"
    trained: ClassVar[bool] = True
    entry_state: ClassVar[tuple[str, ...]] = (KEY_SEGMENT, KEY_ANCHOR)

    sink_tokens: int = 0  # first N positions always visible and never evicted (0 = AnLLM: BOS is dropped)
    anchors_see_anchors: bool = False  # an anchor also sees earlier anchors (AnLLM: no)
    compress_prompt: bool = True  # False: the prompt is kept whole and seen by all (its anchors do not count)

    def __post_init__(self):
        if self.sink_tokens < 0:
            raise ConfigError(f"method.sink_tokens of method={self.name} must be >= 0, got {self.sink_tokens}")
        self._anchor_ids: torch.Tensor | None = None

    # ------------------------------------------------------------------ override points
    def find_anchor_ids(self, model, tokenizer) -> list[int]:
        """Token ids that are anchors (called once by :meth:`prepare`)."""
        raise NotImplementedError

    def insert_anchors(self, text: str) -> str:
        """Text with inserted anchor tokens (methods that insert them)."""
        return text

    # ------------------------------------------------------------------ shared
    def prepare(self, model, tokenizer) -> None:
        ids = sorted(set(self.find_anchor_ids(model, tokenizer)))
        if not ids:
            raise ConfigError(f"method={self.name}: the tokenizer has no anchor token")
        shown = ", ".join(f"{i}={tokenizer.decode([i])!r}" for i in ids[:20])
        log.info("%s: %d anchor token id(s): %s%s", self.name, len(ids), shown, " ..." if len(ids) > 20 else "")
        self._anchor_ids = torch.tensor(ids, dtype=torch.long)

    @property
    def anchor_ids(self) -> list[int]:
        return self._require_prepared().tolist()

    def _require_prepared(self) -> torch.Tensor:
        if self._anchor_ids is None:
            raise RuntimeError(f"method={self.name}: call prepare(model, tokenizer) first")
        return self._anchor_ids

    def is_anchor(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = self._require_prepared()
        if ids.device != input_ids.device:
            self._anchor_ids = ids = ids.to(input_ids.device)
        return torch.isin(input_ids, ids)

    def encode(self, tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
        return tokenizer(self.insert_anchors(text), add_special_tokens=add_special_tokens).input_ids

    # ------------------------------------------------------------------ training face
    def training_batch(self, sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``padding_mask`` (True = real), absolute ``position_ids`` and
        ``labels`` (every real token, anchors included, so the model learns to emit them)."""
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        padding_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
        for r, s in enumerate(sequences):
            input_ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            padding_mask[r, : len(s)] = True
        return {
            "input_ids": input_ids,
            "padding_mask": padding_mask,
            "position_ids": real_tokens(input_ids, padding_mask)[1].clamp(min=0),
            "labels": input_ids.masked_fill(~padding_mask, IGNORE_INDEX),
        }

    def training_tokens(self, input_ids, padding_mask=None, prompt_lengths=None, doc_ids=None) -> TrainingTokens:
        """The rule's view of a right-padded batch. ``prompt_lengths`` ``[B]``: tokens of each row that
        inference would feed as the prompt; needed (only) with ``compress_prompt=False``. ``doc_ids``
        ``[B, T]``: packed documents; each is its own sequence (positions from 0, its own sinks)."""
        real, pos = real_tokens(input_ids, padding_mask, doc_ids)
        anchor = self.is_anchor(input_ids) & real
        sink = torch.full((input_ids.shape[0],), self.sink_tokens, dtype=torch.long, device=input_ids.device)
        if not self.compress_prompt:
            if prompt_lengths is None:
                raise ValueError(
                    f"method={self.name} with compress_prompt=false needs prompt_lengths (the tokens of each row "
                    "that inference feeds as the prompt; zeros for plain text)"
                )
            prompt = torch.as_tensor(prompt_lengths, dtype=torch.long, device=input_ids.device)
            anchor = anchor & (pos >= prompt[:, None])
            sink = torch.maximum(sink, prompt)
        return TrainingTokens(real=real, anchor=anchor, seg=segment_ids(anchor), pos=pos, sink=sink, doc=doc_ids)

    def attention_mask(self, input_ids, padding_mask=None, prompt_lengths=None, doc_ids=None) -> torch.Tensor:
        """Boolean ``[B, 1, T, T]`` (True = visible) of the rule; padding sees only itself (no empty row)."""
        return self.rule_mask(self.training_tokens(input_ids, padding_mask, prompt_lengths, doc_ids))

    def rule_mask(self, t: TrainingTokens) -> torch.Tensor:
        visible = anchor_rule(
            t.seg[:, :, None], t.anchor[:, :, None], t.seg[:, None, :], t.anchor[:, None, :], t.pos[:, None, :],
            t.sink[:, None, None], self.anchors_see_anchors,
        )  # fmt: skip
        return document_mask(visible, t.real, t.doc)

    def token_rule(self, t: TrainingTokens):
        """The rule as a function of (row, query index, key index), for FlexAttention's ``mask_mod``."""
        anchor, seg, pos, sink, see = t.anchor, t.seg, t.pos, t.sink, self.anchors_see_anchors
        return lambda b, q, k: anchor_rule(seg[b, q], anchor[b, q], seg[b, k], anchor[b, k], pos[b, k], sink[b], see)

    def block_mask(self, input_ids, padding_mask=None, prompt_lengths=None, doc_ids=None, block_size: int = 128):
        """The same rule as a FlexAttention ``BlockMask`` (``torch.nn.attention.flex_attention``)."""
        from torch.nn.attention.flex_attention import create_block_mask

        t = self.training_tokens(input_ids, padding_mask, prompt_lengths, doc_ids)
        rule, real = self.token_rule(t), t.real
        doc = t.doc if t.doc is not None else torch.zeros_like(t.seg)

        def mask_mod(b, h, q, k):
            visible = rule(b, q, k) & (doc[b, q] == doc[b, k])
            return (visible & (k <= q) & real[b, q] & real[b, k]) | ((q == k) & ~real[b, q])

        batch, length = input_ids.shape
        return create_block_mask(
            mask_mod, batch, None, length, length, device=str(input_ids.device), BLOCK_SIZE=block_size
        )

    # ------------------------------------------------------------------ inference face
    def before_step(self, cache: KVCache, step: StepInfo) -> None:
        state = cache.method_state
        real = step.positions >= 0
        q_anchor = self.is_anchor(step.input_ids) & real
        if SINK not in state:
            state[SINK] = torch.full_like(step.positions[:, 0], self.sink_tokens)
        if not self.compress_prompt and step.phase == "prefill":  # the prompt: kept whole, no anchors
            state[SINK] = torch.maximum(state[SINK], step.positions.max(-1).values + 1)
            q_anchor = torch.zeros_like(q_anchor)
        open_seg = state.get(OPEN_SEGMENT)
        if open_seg is None:
            open_seg = torch.zeros(q_anchor.shape[0], dtype=torch.long, device=q_anchor.device)
        q_seg = segment_ids(q_anchor, open_seg)
        state[OPEN_SEGMENT] = open_seg + q_anchor.sum(-1)
        append_entry_state(state, {KEY_SEGMENT: q_seg, KEY_ANCHOR: q_anchor})
        # not a tensor, so select_rows leaves it alone; it is rebuilt every step
        fed_anchor = bool(q_anchor.any())  # otherwise the pruned cache holds only what every query may see
        state[STEP] = {
            "seg": q_seg,
            "anchor": q_anchor,
            "fed_anchor": fed_anchor,
            "needs_mask": fed_anchor,
            "mask": None,
        }

    def visibility(self, cache: KVCache, layer_idx: int, keys: slice | None = None) -> torch.Tensor | None:
        step = cache.method_state[STEP]
        if not step["needs_mask"]:
            return None  # every entry held is visible to every query of the step
        if keys is not None:
            return self._rule_mask(cache, layer_idx, keys)
        if step["mask"] is None:  # the same for every layer: they hold the same entries
            step["mask"] = self._rule_mask(cache, layer_idx, slice(None))
        return step["mask"]

    def _rule_mask(self, cache: KVCache, layer_idx: int, keys: slice) -> torch.Tensor:
        state, step = cache.method_state, cache.method_state[STEP]
        k_pos = cache.positions[layer_idx]
        if k_pos.shape != state[KEY_SEGMENT].shape:
            raise RuntimeError(f"method={self.name}: the cache and the anchor bookkeeping disagree")
        k_pos, k_seg, k_anchor = k_pos[:, keys], state[KEY_SEGMENT][:, keys], state[KEY_ANCHOR][:, keys]
        q_real = cache.step_positions >= 0
        rule = anchor_rule(
            step["seg"][:, :, None], step["anchor"][:, :, None], k_seg[:, None, :], k_anchor[:, None, :],
            k_pos[:, None, :], state[SINK][:, None, None], self.anchors_see_anchors,
        )  # fmt: skip
        rule |= ~q_real[:, :, None] | (k_pos < 0)[:, None, :]  # padding: the cache's rule
        return rule[:, None]

    def after_step(self, cache: KVCache, step: StepInfo) -> None:
        state = cache.method_state
        if not state[STEP]["fed_anchor"]:
            return  # nothing closed: everything held is still visible to what comes next
        k_pos = cache.positions[0]
        keep = state[KEY_ANCHOR] | (state[KEY_SEGMENT] == state[OPEN_SEGMENT][:, None])
        keep = (keep | (k_pos < state[SINK][:, None])) & (k_pos >= 0)
        keep_entries(cache, keep, self.entry_state)


def append_entry_state(state: dict, new: dict[str, torch.Tensor]) -> None:
    """Append this step's ``[B, Q]`` values to per-entry method state ``[B, S]``, in place like the
    cache (each key's allocation, with free slots, is kept under ``key + STORE``)."""
    for key, values in new.items():
        if key not in state:
            state[key] = state[key + STORE] = values
            continue
        held, store = state[key], state.get(key + STORE)
        if store is None or store.data_ptr() != held.data_ptr() or store.stride() != held.stride():
            store = held  # the entries were rearranged (pruned, rows joined or left): a new allocation
        state[key + STORE], state[key] = append_along(store, held, values, -1)


def keep_entries(cache: KVCache, keep: torch.Tensor, entry_state: tuple[str, ...]) -> None:
    """Keep the entries where ``keep`` ``[B, S]`` is True in every layer (real deletion) and in the
    per-entry method state; rows keep their entries in order, right-aligned, shorter rows left-filled
    with padding (-1, or False)."""
    if bool(keep.all()):
        return
    kept = keep.sum(-1)
    length, width = keep.shape[-1], int(kept.max())
    order = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)[:, length - width :]
    filler = torch.arange(width, device=keep.device)[None, :] < (width - kept)[:, None]
    index = order.masked_fill(filler, -1)
    cache.keep_all(index)
    safe, state = index.clamp(min=0), cache.method_state
    for key in entry_state:
        taken = torch.gather(state[key], -1, safe)
        state[key] = taken & ~filler if taken.dtype == torch.bool else taken.masked_fill(filler, -1)


def document_mask(visible: torch.Tensor | bool, real: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
    """A full-sequence boolean mask ``[B, 1, T, T]``: ``visible`` (a rule, or True for dense) within
    causality, real tokens and documents; a padding row sees only itself, so no row is empty."""
    index = torch.arange(real.shape[1], device=real.device)
    diagonal = index[:, None] == index[None, :]
    visible = visible & (index[None, :] <= index[:, None]) & real[:, :, None] & real[:, None, :]
    if doc is not None:
        visible = visible & (doc[:, :, None] == doc[:, None, :])
    return (visible | (diagonal & ~real[:, :, None]))[:, None]


def kept_count(is_anchor: list[bool], sink_tokens: int = 0) -> int:
    """Entries per layer and KV head the rule keeps after a stream (a check for tests and scripts)."""
    last = max((i for i, a in enumerate(is_anchor) if a), default=-1)
    return sum(1 for i, a in enumerate(is_anchor) if a or i > last or i < sink_tokens)


def masked_forward(
    model, method: KVMethod, input_ids, padding_mask=None, prompt_lengths=None, doc_ids=None, unwrapped=None, **kwargs
):
    """One forward of ``input_ids`` under the method's training mask, at absolute positions.

    ``doc_ids`` ``[B, T]`` marks packed documents: no attention crosses them and positions restart.
    A method without a training face (dense) gets the plain causal mask within documents.
    ``unwrapped``: the transformers model when ``model`` is a wrapper that runs it (DeepSpeed, DDP).

    With ``flex_attention`` models the mask is a FlexAttention BlockMask; otherwise (and for methods
    that reshape attention, e.g. AnchorCoder's LAA) the boolean mask goes through our attention
    function (:func:`~anchorcoder.generation.attention.engine_attention`, with the model's ``sdpa`` or
    ``eager`` kernel), which skips the blocks above the diagonal. With gradient checkpointing, keep the
    model routed (``with engine_attention(model):`` around forward and backward, non-reentrant
    checkpointing) so that recomputed layers see the method's attention again.
    """
    from anchorcoder.generation.attention import causal_masks, engine_attention

    kwargs.setdefault("use_cache", False)
    unwrapped = model if unwrapped is None else unwrapped
    if not isinstance(method, AnchorMethod):
        real, pos = real_tokens(input_ids, padding_mask, doc_ids)
        with engine_attention(unwrapped), causal_masks():
            mask = document_mask(True, real, doc_ids)
            return model(input_ids=input_ids, attention_mask=mask, position_ids=pos.clamp(min=0), **kwargs)
    tokens = method.training_tokens(input_ids, padding_mask, prompt_lengths, doc_ids)
    positions = tokens.pos.clamp(min=0)
    if unwrapped.config._attn_implementation == "flex_attention" and not method.reshapes_attention:
        mask = method.block_mask(input_ids, padding_mask, prompt_lengths, doc_ids)
        return model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)
    if method.reshapes_attention:
        kwargs.update(kv_method=method, kv_tokens=tokens)
    with engine_attention(unwrapped), causal_masks():
        return model(input_ids=input_ids, attention_mask=method.rule_mask(tokens), position_ids=positions, **kwargs)


def tokens_decoding_to(tokenizer, accept) -> list[int]:
    """Ids whose decoded text satisfies ``accept`` (a vocabulary scan; added tokens included)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if accept(text)]


def add_anchor_token(model, tokenizer, token: str, init: str) -> int:
    """Id of ``token``, added to the tokenizer and the model's embeddings if new.

    A new row starts as the mean of the embedding matrix (``init=mean``) or a copy of the ``"."`` row
    (``init=period``); an untied output embedding gets the same treatment. A token the tokenizer
    already has (a fine-tuned checkpoint) keeps its trained rows.
    """
    existing = tokenizer.convert_tokens_to_ids(token)
    if existing is not None and existing != tokenizer.unk_token_id:
        if existing >= _rows(model.get_input_embeddings().weight):
            raise ConfigError(f"the tokenizer has {token} (id {existing}) but the model's embeddings are smaller")
        return existing
    period = tokenizer.convert_tokens_to_ids(".")
    if init == "period" and (period is None or period == tokenizer.unk_token_id):
        raise ConfigError('method.ac_init=period needs a "." token in the vocabulary; use ac_init=mean')
    tokenizer.add_tokens([token], special_tokens=True)
    new_id = tokenizer.convert_tokens_to_ids(token)
    if new_id >= _rows(model.get_input_embeddings().weight):
        model.resize_token_embeddings(max(len(tokenizer), new_id + 1), mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    with torch.no_grad(), _gathered(matrices):
        for weight in matrices:
            rows = weight[:new_id]
            weight[new_id] = rows.mean(dim=0) if init == "mean" else weight[period]
    return new_id


def _rows(weight: torch.Tensor) -> int:
    """Rows of an embedding matrix, also when DeepSpeed ZeRO-3 holds only a shard of it."""
    return getattr(weight, "ds_shape", weight.shape)[0]


def _gathered(params: list[torch.Tensor]):
    """Whole tensors to edit in place: ZeRO-3 partitions are gathered (and written back) for the block."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    from contextlib import nullcontext

    return nullcontext()
