"""Training-free eviction: rank every cached entry, keep the best ``budget`` per layer and KV head.

:class:`ScoredEviction` holds what such methods share: the budget (a ratio of the tokens seen, or a
number of tokens per layer), when to evict (once after the prompt, or after every step as a cap),
skipped layers, protected sink / recent tokens, rounding, and the gather that really frees memory.
A method overrides one thing, :meth:`ScoredEviction.score` (lower = kept first):

- ``l2norm`` (Devoto et al., EMNLP 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
  Compression"): keep the keys with the lowest L2 norm, per layer and KV head;
- ``streamingllm`` (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention
  Sinks"): the first tokens (sinks) plus the most recent window.

Kept entries stay in positional order; positions stay absolute (RoPE is already in the cached keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from anchorcoder.methods.base import KVMethod, StepInfo
from anchorcoder.registry import METHODS, ConfigError

if TYPE_CHECKING:  # the engine imports the method contract; avoid the cycle
    from anchorcoder.generation.cache import KVCache

SCHEDULES = ("after_prefill", "every_step")
ROUNDINGS = ("ceil", "floor")


def kept_count(seen: torch.Tensor, compression_ratio: float, rounding: str) -> torch.Tensor:
    """Entries kept out of ``seen``, with each reference implementation's own arithmetic.

    ``ceil`` is l2compress' ``ceil(keep_ratio * S)``; ``floor`` is kvpress' ``int(S * (1 - ratio))``,
    at least 1 (kvpress 0.5.5 ``compute_n_kept``). Done in float64, which is Python's float, so the
    counts equal theirs bit for bit.
    """
    keep = 1.0 - compression_ratio
    seen = seen.to(torch.float64)
    if rounding == "ceil":
        return torch.ceil(keep * seen).long()
    return torch.floor(seen * keep).long().clamp(min=1)


@dataclass
class ScoredEviction(KVMethod):
    name: ClassVar[str] = "scored_eviction"

    compression_ratio: float = 0.5
    max_tokens: int | None = None
    schedule: str = "after_prefill"
    prefill_cap: bool = False  # with generation.prefill_chunk: also evict after every prompt chunk
    decode_slack: int = 0
    skip_layers: list[int] = field(default_factory=lambda: [0, 1])
    protect_sink: int = 0
    protect_recent: int = 0
    rounding: str = "ceil"

    def __post_init__(self):
        key = f"method.{{}} of method={self.name}"
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ConfigError(f"{key.format('compression_ratio')} must be in [0, 1), got {self.compression_ratio}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"{key.format('max_tokens')} must be >= 1 or null, got {self.max_tokens}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{key.format('schedule')} must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"{key.format('rounding')} must be one of {', '.join(ROUNDINGS)}, got '{self.rounding}'")
        for name in ("decode_slack", "protect_sink", "protect_recent"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key.format(name)} must be >= 0, got {getattr(self, name)}")
        self.skip_layers = sorted({int(i) for i in self.skip_layers})

    # ------------------------------------------------------------------ the override point
    def score(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rank ``[B, H_kv|1, S]`` of the entries (lower = kept first); ``positions`` is ``[B, H_kv|1, S]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the contract
    def prepare(self, model, tokenizer) -> None:
        layers = model.config.get_text_config().num_hidden_layers
        bad = [i for i in self.skip_layers if not 0 <= i < layers]
        if bad:
            raise ConfigError(f"method.skip_layers has {bad}, but the model has layers 0..{layers - 1}")

    def after_step(self, cache: KVCache, step: StepInfo) -> None:
        if self.schedule == "after_prefill" and (step.phase != "prefill" or not (step.prompt_done or self.prefill_cap)):
            return
        seen = step.positions.max(dim=-1).values + 1  # [B] tokens seen per row
        if self.max_tokens is None:
            budget = kept_count(seen, self.compression_ratio, self.rounding)
        else:
            budget = torch.full_like(seen, self.max_tokens)
        slack = self.decode_slack if self.schedule == "every_step" else 0
        skip = set(self.skip_layers)
        for layer in range(cache.num_layers):
            if layer not in skip:
                self.evict(cache, layer, seen, budget, slack)

    # ------------------------------------------------------------------ selection
    def select(self, keys, positions, seen, budget) -> torch.Tensor:
        """Indices ``[B, H_kv|1, W]`` (ascending) of the entries to keep in one layer.

        Row ``r`` keeps its ``budget[r]`` best real entries (protected ones first); rows that keep
        fewer than the widest row fill the rectangle with padding entries, or, where a row has too
        little padding, with its next-best entries (then it holds more than its budget, and the
        measured bytes say so).
        """
        real = positions >= 0
        seen = seen[:, None, None]
        protected = real & ((positions < self.protect_sink) | (positions >= seen - self.protect_recent))
        n_protected = protected.sum(-1).amax(-1)  # [B]
        n_real = real.sum(-1).amax(-1)
        n_keep = torch.minimum(torch.maximum(budget, n_protected), n_real)  # [B]
        scores = self.score(keys, positions).float()
        scores = scores.masked_fill(protected, float("-inf")).masked_fill(~real, float("inf"))
        order = scores.argsort(dim=-1, stable=True)  # best first; ties go to the earlier stored entry
        rank = order.argsort(dim=-1)
        kept = rank < n_keep[:, None, None]
        group = torch.where(kept, 0, torch.where(real, 2, 1))  # kept, then padding, then evicted
        width = int(n_keep.max())
        index = group.argsort(dim=-1, stable=True)[..., :width]
        return index.sort(dim=-1).values

    def evict(self, cache: KVCache, layer: int, seen, budget, slack: int = 0) -> None:
        positions = cache.positions[layer]
        pos = positions if positions.dim() == 3 else positions[:, None, :]
        real = (pos >= 0).sum(-1).amax(-1)
        if not bool((real > budget + slack).any()):
            return
        index = self.select(cache.keys[layer], pos, seen, budget)
        if index.shape[-1] == pos.shape[-1]:
            return  # nothing to drop
        cache.keep(layer, index[:, 0] if index.shape[1] == 1 else index)


@METHODS.register("l2norm")
@dataclass
class L2Norm(ScoredEviction):
    """Keep the entries whose key has the lowest L2 norm (norms in float32), per layer and KV head."""

    name: ClassVar[str] = "l2norm"
    keep: str = "low_norm"  # low_norm (the method) | high_norm | random (the paper's ablations)
    seed: int = 0  # for keep=random

    def __post_init__(self):
        super().__post_init__()
        if self.keep not in ("low_norm", "high_norm", "random"):
            raise ConfigError(f"method.keep must be one of low_norm, high_norm, random, got '{self.keep}'")

    def score(self, keys, positions):
        if self.keep == "random":
            generator = torch.Generator(device=keys.device).manual_seed(self.seed + keys.shape[-2])
            return torch.rand(keys.shape[:-1], generator=generator, device=keys.device)
        norms = torch.linalg.vector_norm(keys, dim=-1, dtype=torch.promote_types(keys.dtype, torch.float32))
        return norms if self.keep == "low_norm" else -norms


@METHODS.register("streamingllm")
@dataclass
class StreamingLLM(ScoredEviction):
    """Attention sinks (the first ``protect_sink`` tokens) plus the most recent tokens, up to the budget."""

    name: ClassVar[str] = "streamingllm"
    skip_layers: list[int] = field(default_factory=list)
    protect_sink: int = 4

    def score(self, keys, positions):
        return -positions.float()  # most recent first
