"""Sentinel-token span compression (Ren, Jia, Zhu, "Context Compression for Autoregressive
Transformers with Sentinel Tokens", EMNLP 2023, arXiv 2310.08152).

A span is wrapped as ``<CL> span <CR>``. Once ``<CR>`` has been fed, the K/V of the span and of its
``<CL>`` are deleted in every layer, and later tokens see ``<CR>`` in the span's place. One rule
(:func:`span_rule`) gives the training mask (boolean and FlexAttention) and the engine's visibility:

=============  =========================================================================
query          sees (earlier tokens, and itself)
=============  =========================================================================
ordinary       ordinary tokens and every ``<CR>``
span token     the same, plus the earlier tokens of its own span (never its ``<CL>``)
``<CR>``       only its own ``<CL>`` and span
``<CL>``       only itself
=============  =========================================================================

Positions skip the sentinels: ``<CL>`` takes the position of the token before it, ``<CR>`` that of
its span's last token, so the text keeps the positions it has without them. Labels: a sentinel is
never a target nor a source of loss; the token before ``<CL>`` predicts the span's first token and
the span's last token predicts the token after ``<CR>`` (also when spans are adjacent, where the
released code made ``<CL>`` a target).

Where spans go:

- ``training_policy=random``: the paper's training sampler, in tokens. Spans of ``min_span`` to
  ``max_span`` tokens are drawn by rejection, without overlap, until the net fraction ``ratio`` of a
  piece's tokens would be removed. The draw is seeded per piece, and no span crosses a piece's ends
  or its prompt/answer boundary.
- At inference, and in training with ``training_policy=inference``:
  - ``policy=lines`` closes the open span after every ``span_lines`` completed lines and opens the
    next one at once, so every line is compressed once it ends;
  - ``policy=chunks`` does the same every ``span_tokens`` tokens.

  The paper gives no inference policy; both of these are ours. The engine inserts the sentinels as
  the answer is generated (``tokens_before``), and ``encode`` inserts them into the prompt the same way
  (``compress_prompt=false``: the prompt is left whole).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from anchorcoder.methods.anchors import (
    IGNORE_INDEX,
    STEP,
    AnchorMethod,
    TrainingTokens,
    add_anchor_token,
    append_entry_state,
    document_mask,
    keep_entries,
    real_tokens,
    tokens_decoding_to,
)
from anchorcoder.methods.base import StepInfo
from anchorcoder.registry import METHODS, ConfigError

if TYPE_CHECKING:
    from anchorcoder.generation.cache import KVCache

ORD, CL, SPAN, CR = 0, 1, 2, 3  # what a token is
POLICIES = ("lines", "chunks")
TRAINING_POLICIES = ("random", "inference")
KIND, SID, ORDER = "span/kind", "span/sid", "span/order"  # per cached entry: kind, span id (-1: none), feed order
OPEN, OPENED, FED = "span/open", "span/opened", "span/fed"  # per row: open span (-1), spans opened, tokens fed


def span_rule(q_kind, q_sid, q_order, k_kind, k_sid, k_order) -> torch.Tensor:
    """Who may see whom, padding aside; causal by feed order (positions repeat at sentinels). Arguments
    broadcast (queries ``[..., Q, 1]``, keys ``[..., 1, S]``)."""
    kept = (k_kind == ORD) | (k_kind == CR)  # what survives a closed span
    own = (k_sid == q_sid) & (q_sid >= 0)
    reads_text = (q_kind == ORD) | (q_kind == SPAN)
    visible = (kept & reads_text) | (own & (k_kind == SPAN) & ((q_kind == SPAN) | (q_kind == CR)))
    visible = visible | (own & (k_kind == CL) & (q_kind == CR))
    return (visible & (k_order <= q_order)) | (k_order == q_order)


def draw_spans(length: int, ratio: float, min_span: int, max_span: int, adjacent: bool, rng) -> list[tuple[int, int]]:
    """Ren et al.'s sampler, in tokens: ``[start, end)`` spans of ``min_span..max_span`` tokens, drawn
    by rejection without overlap (nor touching, unless ``adjacent``) until the covered tokens reach
    ``ratio * avg / (avg - 1)`` of ``length`` (so that ``ratio`` is the net fraction removed once each
    span's ``<CR>`` is counted), or after ``3 * target / avg`` draws."""
    if length < min_span or ratio <= 0:
        return []
    average = (min_span + max_span) / 2
    target = int(ratio * average / (average - 1) * length)
    spans: list[tuple[int, int]] = []
    covered, gap = 0, 0 if adjacent else 1
    for _ in range(int(3 * target / average) + 1):
        if covered >= target:
            break
        size = rng.randint(min_span, min(max_span, length))
        start = rng.randint(0, length - size)
        end = start + size
        if any(start < e + gap and s < end + gap for s, e in spans):
            continue
        spans.append((start, end))
        covered += size
    return sorted(spans)


@dataclass
class SpanTokens(TrainingTokens):
    """:class:`TrainingTokens` with each token's kind; ``seg`` holds its span id, ``anchor`` marks sentinels."""

    kind: torch.Tensor | None = None


@METHODS.register("span")
@dataclass
class SpanCompression(AnchorMethod):
    name: ClassVar[str] = "span"
    entry_state: ClassVar[tuple[str, ...]] = (KIND, SID, ORDER)

    policy: str = "lines"
    span_lines: int = 1
    span_tokens: int = 16
    training_policy: str = "random"
    ratio: float = 0.5
    min_span: int = 2
    max_span: int = 25
    adjacent: bool = True
    seed: int = 0
    cl_token: str = "<CL>"
    cr_token: str = "<CR>"

    def __post_init__(self):
        super().__post_init__()
        for key, value, valid in (
            ("policy", self.policy, POLICIES),
            ("training_policy", self.training_policy, TRAINING_POLICIES),
        ):
            if value not in valid:
                raise ConfigError(f"method.{key} of method=span must be one of {', '.join(valid)}; got '{value}'")
        for key, value, low in (
            ("span_lines", self.span_lines, 1),
            ("span_tokens", self.span_tokens, 1),
            ("min_span", self.min_span, 1),
        ):
            if value < low:
                raise ConfigError(f"method.{key} of method=span must be >= {low}; got {value}")
        if self.max_span < self.min_span or not 0 <= self.ratio < 1:
            raise ConfigError(
                f"method=span needs method.min_span <= method.max_span and 0 <= method.ratio < 1 "
                f"(got {self.min_span}, {self.max_span}, {self.ratio})"
            )
        if self.sink_tokens or self.anchors_see_anchors:
            raise ConfigError("method=span has no sinks nor anchors: method.sink_tokens=0, anchors_see_anchors=false")
        self._cl = self._cr = -1
        self._newlines: frozenset[int] = frozenset()

    # ------------------------------------------------------------------ tokens
    def find_anchor_ids(self, model, tokenizer) -> list[int]:
        self._cl = add_anchor_token(model, tokenizer, self.cl_token, "mean")
        self._cr = add_anchor_token(model, tokenizer, self.cr_token, "mean")
        if self._cl == self._cr:
            raise ConfigError(f"method.cl_token and method.cr_token of method=span must differ; both are {self._cl}")
        self.hidden_token_ids = self.skip_position_ids = frozenset({self._cl, self._cr})
        self._newlines = frozenset(tokens_decoding_to(tokenizer, lambda text: "\n" in text)) - self.hidden_token_ids
        return [self._cl, self._cr]

    def encode(self, tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        return self.insert_spans(ids) if self.compress_prompt else ids

    def encode_continuation(self, tokenizer, text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids  # the engine inserts the sentinels as it feeds

    def insert_spans(self, ids: list[int], start: int = 0) -> list[int]:
        """``ids`` with the inference policy's sentinels from ``start`` on (the last span left open)."""
        out = list(ids[:start])
        for token in ids[start:]:
            out += self.tokens_before([], out, token)
            out.append(token)
        return out

    def tokens_before(self, prompt: list[int], generated: list[int], token: int) -> list[int]:
        content = self._open_span(prompt, generated)
        if content is None:
            return [self._cl]
        complete = (
            len(content) >= self.span_tokens
            if self.policy == "chunks"
            else bool(content) and content[-1] in self._newlines
            and sum(t in self._newlines for t in content) >= self.span_lines
        )  # fmt: skip
        return [self._cr, self._cl] if complete else []

    def _open_span(self, prompt: list[int], generated: list[int]) -> list[int] | None:
        """The tokens of the open span (after the last ``<CL>``), or None when no span is open."""
        content: list[int] = []
        for part in (generated, prompt):
            for token in reversed(part):
                if token == self._cl:
                    return content[::-1]
                if token == self._cr:
                    return None
                content.append(token)
        return None

    # ------------------------------------------------------------------ training face
    def training_piece(self, ids: list[int], prompt_len: int, seq_len: int) -> tuple[list[int], int]:
        """The piece's sentinels drawn anew by ``training_policy``; no span crosses the piece's ends or
        the prompt's end; a span the length limit would cut is left out (with the tokens after it)."""
        sentinels = self.hidden_token_ids
        plain = [t for t in ids if t not in sentinels]
        prompt = prompt_len - sum(t in sentinels for t in ids[:prompt_len])
        start = 0 if self.compress_prompt else prompt
        if self.training_policy == "inference":  # as the engine would insert them (the last span may stay open)
            out = self.insert_spans(plain, start)
            return out[:seq_len], min(len(self.insert_spans(plain[:prompt], start)), seq_len)
        rng = random.Random(zlib.crc32(str((self.seed, plain)).encode()))
        out = plain[:start]
        for begin, end in [(0, prompt), (prompt, len(plain))] if self.compress_prompt else [(prompt, len(plain))]:
            cursor = begin
            for s, e in draw_spans(end - begin, self.ratio, self.min_span, self.max_span, self.adjacent, rng):
                out += [*plain[cursor : begin + s], self._cl, *plain[begin + s : begin + e], self._cr]
                cursor = begin + e
            out += plain[cursor:end]
            if end == prompt:
                prompt_len = len(out)  # the prompt with its spans
        return self._cut(out, seq_len), min(prompt_len, seq_len)

    def _cut(self, ids: list[int], seq_len: int) -> list[int]:
        """``ids[:seq_len]``, and before the ``<CL>`` of a span that limit would leave open."""
        if len(ids) <= seq_len:
            return ids
        ids = ids[:seq_len]
        last_cl = max((i for i, t in enumerate(ids) if t == self._cl), default=-1)
        if last_cl >= 0 and self._cr not in ids[last_cl:]:
            ids = ids[:last_cl]
        return ids

    def training_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each real token predicts the next real token (the model shifts labels by one); sentinels
        predict nothing and are never predicted."""
        sentinel = self.is_anchor(input_ids)
        length = input_ids.shape[1]
        index = torch.arange(length, device=input_ids.device).expand_as(input_ids)
        beyond = torch.full_like(index, length)
        # the first real token at or after each position (length when none)
        upcoming = torch.where(sentinel, beyond, index).flip(-1).cummin(-1).values.flip(-1)
        target = upcoming[:, 1:]  # for the source at j: the first real token after j
        found = target < length
        picked = torch.gather(labels, -1, target.clamp(max=length - 1))
        out = torch.full_like(labels, IGNORE_INDEX)
        out[:, 1:] = torch.where(found & ~sentinel[:, :-1], picked, IGNORE_INDEX)
        return out

    def training_tokens(self, input_ids, padding_mask=None, prompt_lengths=None, doc_ids=None) -> SpanTokens:
        real, _ = real_tokens(input_ids, padding_mask, doc_ids)
        kind, sid, _ = self._kinds(input_ids, real)
        sentinel = (kind == CL) | (kind == CR)
        ordinary = (~sentinel & real).long()
        if doc_ids is not None:  # positions restart in every document
            starts = torch.ones_like(real)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            counted = ordinary.cumsum(-1)
            base = torch.cummax(torch.where(starts, counted - ordinary, torch.zeros_like(counted)), -1).values
            before = counted - ordinary - base
        else:
            before = ordinary.cumsum(-1) - ordinary
        pos = (before - sentinel.long()).clamp(min=0).masked_fill(~real, -1)
        sink = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        return SpanTokens(real=real, anchor=sentinel, seg=sid, pos=pos, sink=sink, doc=doc_ids, kind=kind)

    def _kinds(self, input_ids, real, open_before=None, opened=None):
        """(kind, span id) of every token ``[B, T]``, given the span open before the first token and the
        spans opened so far (``[B]``; none and 0 by default)."""
        self._require_prepared()
        batch, length = input_ids.shape
        device = input_ids.device
        cl, cr = (input_ids == self._cl) & real, (input_ids == self._cr) & real
        if open_before is None:
            open_before = torch.full((batch,), -1, dtype=torch.long, device=device)
            opened = torch.zeros(batch, dtype=torch.long, device=device)
        index = torch.arange(length, device=device).expand(batch, -1)
        last_cl = torch.cummax(torch.where(cl, index, -1), -1).values
        last_cr = torch.cummax(torch.where(cr, index, -1), -1).values
        latest = opened[:, None] + cl.long().cumsum(-1) - 1  # id of the latest <CL> up to each token
        carried = open_before[:, None].expand(-1, length)
        open_after = torch.where(last_cl > last_cr, latest, torch.where(last_cr > last_cl, -1, carried))
        open_at = torch.cat([open_before[:, None], open_after[:, :-1]], dim=-1)  # just before each token
        kind = torch.where(open_at >= 0, SPAN, ORD)
        kind = torch.where(cl, CL, torch.where(cr, CR, kind))
        sid = torch.where(cl, latest, torch.where(kind == ORD, -1, open_at))
        return kind, sid, open_after[:, -1] if length else open_before

    def rule_mask(self, t: SpanTokens) -> torch.Tensor:
        order = torch.arange(t.kind.shape[1], device=t.kind.device)
        visible = span_rule(
            t.kind[:, :, None], t.seg[:, :, None], order[None, :, None],
            t.kind[:, None, :], t.seg[:, None, :], order[None, None, :],
        )  # fmt: skip
        return document_mask(visible, t.real, t.doc)

    def token_rule(self, t: SpanTokens):
        kind, sid = t.kind, t.seg
        return lambda b, q, k: span_rule(kind[b, q], sid[b, q], q, kind[b, k], sid[b, k], k)

    # ------------------------------------------------------------------ inference face
    def before_step(self, cache: KVCache, step: StepInfo) -> None:
        state = cache.method_state
        real = step.positions >= 0
        batch, length = step.input_ids.shape
        if OPEN not in state:
            state[OPEN] = torch.full((batch,), -1, dtype=torch.long, device=real.device)
            state[OPENED] = torch.zeros(batch, dtype=torch.long, device=real.device)
            state[FED] = torch.zeros(batch, dtype=torch.long, device=real.device)
        held_open = bool((state[OPEN] >= 0).any())
        kind, sid, open_after = self._kinds(step.input_ids, real, state[OPEN], state[OPENED])
        order = state[FED][:, None] + torch.arange(length, device=real.device)
        state[OPENED] = state[OPENED] + ((kind == CL) & real).sum(-1)
        state[OPEN], state[FED] = open_after, state[FED] + length
        append_entry_state(state, {KIND: kind, SID: sid, ORDER: order})
        sentinels = bool(((kind == CL) | (kind == CR)).any())
        # not a tensor, so the cache's row operations leave it alone; rebuilt every step. A mask is needed
        # while a <CL> is held (span tokens must not see it) or a sentinel is fed
        state[STEP] = {
            "kind": kind, "sid": sid, "order": order, "mask": None,
            "needs_mask": held_open or sentinels, "closed": bool((kind == CR).any()),
        }  # fmt: skip

    def _rule_mask(self, cache: KVCache, layer_idx: int, keys: slice) -> torch.Tensor:
        state, step = cache.method_state, cache.method_state[STEP]
        k_pos = cache.positions[layer_idx]
        if k_pos.shape != state[KIND].shape:
            raise RuntimeError("method=span: the cache and the span bookkeeping disagree")
        k_pos = k_pos[:, keys]
        rule = span_rule(
            step["kind"][:, :, None], step["sid"][:, :, None], step["order"][:, :, None],
            state[KIND][:, None, keys], state[SID][:, None, keys], state[ORDER][:, None, keys],
        )  # fmt: skip
        rule |= (cache.step_positions < 0)[:, :, None] | (k_pos < 0)[:, None, :]  # padding: the cache's rule
        return rule[:, None]

    def after_step(self, cache: KVCache, step: StepInfo) -> None:
        state = cache.method_state
        if not state[STEP]["closed"]:
            return  # nothing closed: every entry held may still be seen
        kind, sid, open_span = state[KIND], state[SID], state[OPEN][:, None]
        keep = (kind == ORD) | (kind == CR) | ((sid == open_span) & (open_span >= 0))
        keep_entries(cache, keep & (cache.positions[0] >= 0), self.entry_state)


def kept_entries(kinds: list[int]) -> int:
    """Entries per layer and KV head held after a stream of token kinds: ordinary tokens, ``<CR>``s
    and the open span (its ``<CL>`` and tokens), if any (a check for tests and scripts)."""
    last_cl = max((i for i, k in enumerate(kinds) if k == CL), default=-1)
    open_tail = last_cl >= 0 and CR not in kinds[last_cl:]
    return sum(1 for i, k in enumerate(kinds) if k in (ORD, CR) or (open_tail and i >= last_cl))
