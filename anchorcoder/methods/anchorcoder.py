"""AnchorCoder (Zhang et al., "Anchor Attention, Small Cache: Code Generation with Large Language
Models", arXiv 2411.06680): line anchors for code.

Only the abstract of the paper is confirmed; the rest follows the reconstruction and recommended
defaults of ``shared/research/methods-anchor.md`` §2 (quoted as "note §x" below).

- **TAA** (token-wise anchor attention): segment = one line, anchor = the token that ends it. The
  anchor rule and both faces are :class:`~anchorcoder.methods.anchors.AnchorMethod`'s:
  ``anchor_mode=newline`` makes every vocabulary token that contains ``"\\n"`` an anchor (merged BPE
  tokens such as ``":\\n"`` or ``"\\n   "`` included; no new token); ``inserted`` adds ``<ANC>`` after
  every newline. Defaults (note §2.2): BOS kept as a sink, anchors do not see earlier anchors, the
  prompt is compressed too.
- **LAA** (layer-wise anchor attention): layer ``l`` also attends to the anchor keys and values of a
  source layer (``l - 1``, or one fixed layer ``s`` for every ``l > s``), under the same softmax as its
  own keys. A query sees a source anchor when it would see that anchor in its own layer: anchors of
  earlier lines, for non-anchor queries (anchor queries too with ``anchors_see_anchors``). Nothing is
  stored twice: the engine reads the source layer's cached entries.
- **MHPE** (multi-head positional encoding), **our reconstruction** (the paper's formula was not
  recovered, note §2.3): the second half of the KV heads (and the query heads that read them) use the
  line index as their rotary position instead of the token index, so those heads measure distance in
  lines, which compression does not disturb. Implemented by turning the model's rotary embedding
  further by ``line - token`` positions, for queries and (before they are cached) keys.

Positions are absolute (tokens seen): masked training and pruned inference give the same logits.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from anchorcoder.generation.attention import KeyBlocks
from anchorcoder.generation.cache import take_entries
from anchorcoder.methods.anchors import (
    KEY_ANCHOR,
    KEY_SEGMENT,
    STEP,
    AnchorMethod,
    TrainingTokens,
    add_anchor_token,
    earlier_anchors,
    tokens_decoding_to,
)
from anchorcoder.registry import METHODS, ConfigError

log = logging.getLogger(__name__)

ANCHOR_MODES = ("newline", "inserted")


@METHODS.register("anchorcoder")
@dataclass
class AnchorCoder(AnchorMethod):
    name: ClassVar[str] = "anchorcoder"

    sink_tokens: int = 1  # keep BOS (position 0): a deviation from AnLLM, note §2.2
    anchor_mode: str = "newline"
    anc_token: str = "<ANC>"
    laa: bool = True
    laa_source_layer: int | None = None  # None: the previous layer; s: layer s for every layer above it
    laa_gate: bool = False  # LAA as a separately normalised attention added through a per-head gate, closed at init
    laa_anchor_queries: bool = False  # anchor queries also read the source layer's earlier anchors (LAA only)
    mhpe: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.anchor_mode not in ANCHOR_MODES:
            raise ConfigError(
                f"method.anchor_mode of method=anchorcoder must be one of {', '.join(ANCHOR_MODES)}; "
                f"got '{self.anchor_mode}'"
            )
        if self.laa_source_layer is not None and self.laa_source_layer < 0:
            raise ConfigError(
                f"method.laa_source_layer must be null or a layer index >= 0, got {self.laa_source_layer}"
            )
        if self.laa_anchor_queries and not self.laa:
            log.warning("method.laa_anchor_queries=true changes nothing here: it only acts with method.laa=true")
        elif self.laa_anchor_queries and self.anchors_see_anchors:
            log.warning(
                "method.laa_anchor_queries=true changes nothing here: "
                "method.anchors_see_anchors=true already lets anchor queries read them"
            )
        self._inv_freq: torch.Tensor | None = None
        self._num_layers = 0

    # ------------------------------------------------------------------ setup
    def prepare(self, model, tokenizer) -> None:
        super().prepare(model, tokenizer)
        cfg = model.config.get_text_config()
        self._num_layers = cfg.num_hidden_layers
        if self.laa and self.laa_source_layer is not None and self.laa_source_layer >= self._num_layers - 1:
            raise ConfigError(
                f"method.laa_source_layer={self.laa_source_layer}: the model has {self._num_layers} layers "
                f"(0..{self._num_layers - 1}) and no layer above it would read it"
            )
        if self.laa and self.laa_gate:
            attach_laa_gates(
                model, {layer for layer in range(self._num_layers) if self.source_layer(layer) is not None}
            )
        if self.mhpe:
            kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            rotary = next((m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)), None)
            if kv_heads < 2 or rotary is None or 2 * rotary.inv_freq.numel() != head_dim:
                raise ConfigError(
                    "method.mhpe=true needs >= 2 KV heads and a rotary embedding over the whole head "
                    f"(got {kv_heads} KV heads, head_dim {head_dim}, rotary {rotary is not None})"
                )
            self._inv_freq = rotary.inv_freq.detach().float().clone()

    def find_anchor_ids(self, model, tokenizer) -> list[int]:
        if self.anchor_mode == "newline":
            return tokens_decoding_to(tokenizer, lambda text: "\n" in text)
        anc_id = add_anchor_token(model, tokenizer, self.anc_token, "mean")
        self.hidden_token_ids = frozenset({anc_id})
        return [anc_id]

    def insert_anchors(self, text: str) -> str:
        return text.replace("\n", "\n" + self.anc_token) if self.anchor_mode == "inserted" else text

    @property
    def reshapes_attention(self) -> bool:
        return self.laa or self.mhpe

    @property
    def reads_other_layers(self) -> bool:
        return self.laa

    def source_layer(self, layer: int) -> int | None:
        """The layer whose anchors layer ``layer`` also attends to (LAA), or None."""
        if not self.laa:
            return None
        if self.laa_source_layer is None:
            return layer - 1 if layer >= 1 else None
        return self.laa_source_layer if layer > self.laa_source_layer else None

    def _is_source(self, layer: int) -> bool:
        if not self.laa:
            return False
        if self.laa_source_layer is None:
            return layer < self._num_layers - 1
        return layer == self.laa_source_layer

    def laa_visibility(self, input_ids, padding_mask=None, prompt_lengths=None):
        """For a full sequence: positions ``[B, A]`` of the anchors every reading layer takes from its
        source layer (-1 = none), and which queries see them, ``[B, 1, T, A]``."""
        view = _View.of(self.training_tokens(input_ids, padding_mask, prompt_lengths))
        columns = self._laa_columns(view)
        batch, length = input_ids.shape
        if columns is None:
            none = torch.zeros(batch, 1, length, 0, dtype=torch.bool, device=input_ids.device)
            return input_ids.new_zeros((batch, 0)), none
        index, visible, _ = columns
        valid = torch.arange(index.shape[1], device=index.device)[None, :] < view.k_anchor.sum(-1, keepdim=True)
        return torch.gather(view.tokens.pos, -1, index).masked_fill(~valid, -1), visible

    # ------------------------------------------------------------------ attention
    def adapt_attention(self, module, query, key, value, mask, source):
        """TAA's mask is the caller's; here LAA prepends the source layer's anchors to the keys (one
        softmax), or with ``laa_gate`` leaves them for :meth:`adapt_output`; MHPE turns half the heads."""
        view = _View.of(source)
        layer = module.layer_idx
        if self.mhpe:
            query, key = self._line_positions(view, query, key)
        if view.training and self._is_source(layer):  # the engine reads source layers from its cache
            view.tokens.layer_kv[layer] = (key, value)
        src = self.source_layer(layer)
        if src is None:
            return query, key, value, mask
        columns = self._laa_columns(view)
        if columns is None:
            return query, key, value, mask
        index, visible, all_visible = columns
        extra_key, extra_value = self._source_anchors(view, src, index)
        if self.laa_gate:  # a separate attention, added after the layer's own (adapt_output)
            view.memo[f"laa/gated/{layer}"] = (query, extra_key, extra_value)  # the query as MHPE turned it
            return query, key, value, mask
        key = torch.cat([extra_key, key], dim=2)
        value = torch.cat([extra_value, value], dim=2)
        if mask is None and all_visible and query.shape[2] == 1:
            return query, key, value, None  # one query that sees every cached entry and every source anchor
        if isinstance(mask, KeyBlocks):  # a chunk over a long cache: the source anchors' columns come first
            return query, key, value, mask.after(visible)
        if mask is None:
            mask = view.base_mask(layer)
        memo = view.memo.get("laa/mask")
        if memo is None or memo[0] is not mask:  # hits when the layers share one mask
            extra = visible.expand(mask.shape[0], mask.shape[1], -1, -1)
            memo = view.memo["laa/mask"] = (mask, torch.cat([extra, mask], dim=-1))
        return query, key, value, memo[1]

    def adapt_output(self, module, output, source, scaling: float):
        """Gated LAA (``laa_gate``), as LLaMA-Adapter's zero-initialised attention: the layer's own
        attention output plus ``tanh(gate_h)`` times a softmax over the visible source anchors alone,
        per query head. The gate starts at 0, so an untrained model computes exactly TAA; queries that
        see no source anchor add nothing."""
        view = _View.of(source)
        extra = view.memo.pop(f"laa/gated/{module.layer_idx}", None)
        if extra is None:
            return output
        query, extra_key, extra_value = extra
        _, visible, _ = self._laa_columns(view)
        groups = query.shape[1] // extra_key.shape[1]
        extra_key, extra_value = (x.repeat_interleave(groups, dim=1) for x in (extra_key, extra_value))
        sees_any = visible.any(-1, keepdim=True)  # [B, 1, Q, 1]; rows that see none get a dummy column
        scores = (query @ extra_key.transpose(2, 3)) * scaling
        scores = scores.masked_fill(~(visible | ~sees_any), torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores.float(), dim=-1).to(query.dtype) * sees_any
        gate = module.laa_gate().to(query.dtype)  # [H], float32 in the module
        added = (weights @ extra_value) * gate[None, :, None, None]  # [B, H, Q, D]
        return output + added.transpose(1, 2).reshape(output.shape)

    def _source_anchors(self, view: _View, src: int, index: torch.Tensor):
        """Keys and values of the source layer's anchors at ``index``. In the engine they are kept
        across steps until an anchor is fed or the cache is pruned (anchors already held never
        change, and the keys a step appends come after them)."""
        memo = None if view.training else view.cache.layout_memo
        if memo is not None and not view.memo["fed_anchor"] and ("laa", src) in memo:
            return memo[("laa", src)]
        found = tuple(take_entries(x, index) for x in view.layer_kv(src))
        if memo is not None:
            memo[("laa", src)] = found
        return found

    def _laa_columns(self, view: _View):
        """(index ``[B, A]`` of the anchors among the keys, their visibility ``[B, 1, Q, A]``, whether
        every column is visible), or None without anchors; the same for every layer of a step."""
        if "laa/columns" not in view.memo:
            count = view.k_anchor.sum(-1)
            width = int(count.max()) if count.numel() else 0
            if width == 0:
                view.memo["laa/columns"] = None
            else:
                index = torch.argsort((~view.k_anchor).to(torch.int8), dim=-1, stable=True)[:, :width]
                valid = torch.arange(width, device=index.device)[None, :] < count[:, None]
                seg = torch.gather(view.k_seg, -1, index)
                visible = earlier_anchors(
                    view.q_seg[:, :, None], view.q_anchor[:, :, None], seg[:, None, :], valid[:, None, :],
                    self.anchors_see_anchors or self.laa_anchor_queries,
                ) & view.q_real[:, :, None]  # fmt: skip
                doc = view.tokens.doc if view.training else None
                if doc is not None:  # packed rows: no anchor of another document
                    visible = visible & (doc[:, :, None] == torch.gather(doc, -1, index)[:, None, :])
                view.memo["laa/columns"] = (index, visible[:, None], bool(visible.all()))
        return view.memo["laa/columns"]

    def _line_positions(self, view: _View, query, key):
        """MHPE (our reconstruction): the second half of the KV heads and their query heads rotate at
        the line index. RoPE rotations compose, so turning a key rotated at token ``p`` by ``line - p``
        gives the key rotated at ``line``. New keys are turned before they are cached."""
        if "mhpe/rotation" not in view.memo:
            # float64 angles: float32 cos/sin can differ by an ulp between a long and a one-token call
            delta = (view.q_seg - view.q_pos.clamp(min=0)).double()
            angles = delta[:, None, :, None] * self._inv_freq.to(delta.device, torch.float64)
            angles = torch.cat([angles, angles], dim=-1)
            view.memo["mhpe/rotation"] = (angles.cos().to(query.dtype), angles.sin().to(query.dtype))
        cos, sin = view.memo["mhpe/rotation"]
        kv_heads, heads = key.shape[1], query.shape[1]
        first_kv = kv_heads - kv_heads // 2
        query = _turn_heads(query, first_kv * (heads // kv_heads), cos, sin)
        fed = query.shape[2]
        if view.training:
            key = _turn_heads(key, first_kv, cos, sin)
        else:  # the step's keys, in place in the cache: every later step reads them turned
            new = key[:, first_kv:, -fed:]
            new.copy_(_turn_heads(new, 0, cos, sin))
        return query, key


class LAAGate(torch.nn.Module):
    """Per-head gate of gated LAA, one per attention module (``self_attn.laa_gate``); starts closed.
    A module (not a bare parameter) so that LoRA trains and saves it as a ``modules_to_save`` entry."""

    def __init__(self, heads: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(heads))

    def forward(self) -> torch.Tensor:
        return torch.tanh(self.weight)


GATE_MODULE = "laa_gate"


def attach_laa_gates(model, layers) -> int:
    """Give the attention module of every layer in ``layers`` (those that read a source layer) a
    closed :class:`LAAGate`, kept if present; returns how many the model has. Gates are float32
    whatever the model's dtype: a bf16 weight near 0.1 cannot move by a learning rate of 2e-4."""
    count = 0
    for module in model.modules():
        if getattr(module, "layer_idx", None) in layers and hasattr(module, "q_proj"):
            if not hasattr(module, GATE_MODULE):
                heads = module.config.num_attention_heads
                module.add_module(GATE_MODULE, LAAGate(heads).to(device=module.q_proj.weight.device))
            count += 1
    if not count:
        raise ConfigError("method.laa_gate=true: no attention module with q_proj and layer_idx in this model")
    return count


def saved_gate_layers(names) -> set[int]:
    """Layers whose gate is among the tensor names of a saved adapter or model."""
    found = (re.search(rf"layers\.(\d+)\.self_attn\.{GATE_MODULE}\.", name) for name in names)
    return {int(m.group(1)) for m in found if m}


def _turn_heads(x: torch.Tensor, first_head: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Heads ``first_head:`` of ``x`` ``[B, H, T, D]`` rotated by ``cos``/``sin`` ``[B, 1, T, D]`` (the
    rotate-half convention of Llama-family rotary embeddings)."""
    part = x[:, first_head:]
    half = part.shape[-1] // 2
    turned = part * cos + torch.cat([-part[..., half:], part[..., :half]], dim=-1) * sin
    return turned if first_head == 0 else torch.cat([x[:, :first_head], turned], dim=1)


@dataclass
class _View:
    """What :meth:`AnchorCoder.adapt_attention` needs of one forward, from either face: segment and
    anchor flag of the queries and of the keys (the same for every layer), per-step memo, and where a
    layer's keys and values are (the cache in the engine; this forward's attention calls in training)."""

    training: bool
    q_seg: torch.Tensor
    q_anchor: torch.Tensor
    q_pos: torch.Tensor
    k_seg: torch.Tensor
    k_anchor: torch.Tensor
    memo: dict
    tokens: TrainingTokens | None = None
    cache: object = None

    @property
    def q_real(self) -> torch.Tensor:
        return self.q_pos >= 0

    @staticmethod
    def of(source) -> _View:
        if isinstance(source, TrainingTokens):
            t = source
            return _View(True, t.seg, t.anchor, t.pos, t.seg, t.anchor, t.memo, tokens=t)
        state = source.method_state
        step = state[STEP]
        return _View(
            False, step["seg"], step["anchor"], source.step_positions, state[KEY_SEGMENT], state[KEY_ANCHOR],
            step, cache=source,
        )  # fmt: skip

    def layer_kv(self, layer: int):
        if self.training:
            return self.tokens.layer_kv[layer]
        return self.cache.keys[layer], self.cache.values[layer]

    def base_mask(self, layer: int) -> torch.Tensor:
        return self.cache.base_mask(layer)  # training always passes its mask
