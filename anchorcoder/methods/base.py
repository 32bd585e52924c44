"""The method contract: every KV-compression method is one registered dataclass.

Inference face (used by the generation engine), each an override point with a no-op default:

- :meth:`prepare`     once per model: add tokens, scan the vocabulary, check the architecture;
- :meth:`encode`      text -> token ids (a method may insert anchor tokens, e.g. AnLLM-AC's ``<AC>``);
- :meth:`before_step` before every prefill / decode forward: note what is being fed;
- :meth:`visibility`  per layer and step: which cached entries the current queries may see, as a
  boolean mask combined (AND) with causality and padding, or None for "all of them";
- :meth:`after_step`  after every prefill / decode forward: what stays in the cache
  (:meth:`KVCache.keep` really frees the rest);
- :meth:`adapt_attention` per layer and step, for methods that change attention itself (extra keys,
  other rotary positions): the query, keys, values and mask the kernel gets.

``hidden_token_ids`` (filled by :meth:`prepare`) are tokens the method adds to the stream that never
reach decoded text; ``skip_position_ids`` are tokens that take the position of the token before
them (no positional distance, e.g. span sentinels). :meth:`tokens_before` lets a method insert
tokens while decoding (fed one per step, never sampled nor scored).

Positions are absolute (tokens seen), whatever a layer's stored length. Trained methods add a
training face (see :class:`anchorcoder.methods.anchors.AnchorMethod`): the same token insertion,
labels and the attention mask of one full forward, tied to the inference face by the invariant that
the masked forward and incremental decoding with real deletion give the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from anchorcoder.registry import METHODS

if TYPE_CHECKING:  # the engine imports the method contract; avoid the cycle
    from anchorcoder.generation.cache import KVCache


@dataclass
class StepInfo:
    """What was just fed to the model."""

    input_ids: torch.Tensor  # [B, Q]
    positions: torch.Tensor  # [B, Q], -1 = padding
    phase: str  # "prefill" | "decode"
    prompt_done: bool = True  # False for a prompt chunk that more prompt follows (generation.prefill_chunk)


@dataclass
class KVMethod:
    name: ClassVar[str] = "base"
    trained: ClassVar[bool] = False  # whether the method needs fine-tuning to keep quality
    handles_padding: ClassVar[bool] = True  # False: left-padded batches are refused (batch_size must be 1)
    chunked_prefill: ClassVar[bool] = True  # False: generation.prefill_chunk is refused (one prefill forward)
    # keys of cache.method_state holding one value per cached entry ([B, S], aligned with the shared
    # positions): the cache pads and trims them with its entries when rows join or leave a batch
    entry_state: ClassVar[tuple[str, ...]] = ()
    hidden_token_ids: ClassVar[frozenset[int]] = frozenset()  # set per instance by prepare()
    skip_position_ids: ClassVar[frozenset[int]] = frozenset()  # set per instance by prepare()

    def prepare(self, model, tokenizer) -> None:
        """Adapt model and tokenizer once (e.g. add an anchor token)."""

    def encode(self, tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt."""
        return tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def encode_continuation(self, tokenizer, text: str) -> list[int]:
        """Token ids of text that continues a prompt (a teacher-forced target), as the method would
        have generated them: by default :meth:`encode` without special tokens."""
        return self.encode(tokenizer, text, add_special_tokens=False)

    def tokens_before(self, prompt: list[int], generated: list[int], token: int) -> list[int]:
        """Tokens to feed before a generated ``token`` (not yet in ``generated``), e.g. sentinels
        that close or open a span; the engine feeds them one per step and samples nothing from them."""
        return []

    def training_piece(self, ids: list[int], prompt_len: int, seq_len: int) -> tuple[list[int], int]:
        """A training piece (at most ``seq_len`` tokens, its first ``prompt_len`` the prompt) as the method
        trains on it, e.g. with spans drawn for it, and its prompt length then."""
        return ids, prompt_len

    def training_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Labels ``[B, T]`` (shifted by the model) as the method trains them; by default unchanged."""
        return labels

    def before_step(self, cache: KVCache, step: StepInfo) -> None:
        """Called with what is about to be fed, before the forward."""

    def visibility(self, cache: KVCache, layer_idx: int, keys: slice | None = None) -> torch.Tensor | None:
        """Extra boolean mask ``[B, 1|H_kv, Q, S_l]`` for this layer's attention, or None; ``keys``:
        only those columns (a chunk over a long cache is attended a block of keys at a time)."""
        return None

    def after_step(self, cache: KVCache, step: StepInfo) -> None:
        """Prune the cache after a forward pass."""

    @property
    def reshapes_attention(self) -> bool:
        """Whether :meth:`adapt_attention` changes anything (lets plain forwards skip it)."""
        return False

    @property
    def reads_other_layers(self) -> bool:
        """Whether one layer's attention reads another layer's cache (AnchorCoder's LAA): refused on a
        model spread over several devices (``model.device_map``)."""
        return False

    def adapt_attention(self, module, query, key, value, mask, source):
        """Change what one layer's attention computes, after its mask is built: returns
        ``(query, key, value, mask)``. ``source`` is the :class:`KVCache` in the engine, or the
        training forward's token view (e.g. AnchorCoder's extra keys of another layer and its
        per-head rotary positions)."""
        return query, key, value, mask

    def adapt_output(self, module, output, source, scaling: float):
        """Change one layer's attention output ``[B, Q, H, D]`` (after the kernel), e.g. add a gated
        attention over other keys (what it needs of :meth:`adapt_attention`, it keeps itself)."""
        return output

    def describe(self) -> dict:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


def stream_positions(input_ids: torch.Tensor, skips: frozenset[int] = frozenset()) -> torch.Tensor:
    """Absolute positions of a token stream ``[..., T]``: the tokens before each one, not counting
    ``skips``, which take the position of the token before them (0 at the start)."""
    index = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    if not skips:
        return index
    skipped = torch.isin(input_ids, torch.tensor(sorted(skips), device=input_ids.device)).long()
    before = (1 - skipped).cumsum(-1) - (1 - skipped)  # ordinary tokens before each one
    return (before - skipped).clamp(min=0)


def build_method(cfg: dict) -> KVMethod:
    return METHODS.build(cfg)
