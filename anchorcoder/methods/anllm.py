"""AnLLM (Pang et al., Findings of ACL 2024, "Anchor-based Large Language Models", arXiv 2402.07616).

Segment = sentence; the cache keeps past sentence anchors plus the open sentence (rule and both
faces in :mod:`anchorcoder.methods.anchors`). Two variants:

- ``ep`` (end points): the period token is the anchor. The paper uses the English period only
  (official code: the one id of ``"."``); every ``"."`` token counts, decimals, abbreviations and, in
  code, attribute access (``self.x``) included;
- ``ac`` (anchor token): a new ``<AC>`` token after each sentence (our splitter,
  :mod:`anchorcoder.methods.sentences`, in place of NLTK punkt), including the last one. Its
  embedding starts as the mean of the embedding matrix (the paper; the official code copies ``"."``:
  ``ac_init=period``). The model learns to emit ``<AC>`` in training; it never reaches decoded text.

Positions are absolute (tokens seen, ``<AC>`` included); the official code's inference omits
``position_ids`` (research note §3.4), which only a compacted-position reading of it would reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from anchorcoder.methods.anchors import AnchorMethod, add_anchor_token, tokens_decoding_to
from anchorcoder.methods.sentences import insert_after_sentences
from anchorcoder.registry import METHODS, ConfigError

VARIANTS = ("ep", "ac")
EP_ANCHORS = ("period", "period_end")
AC_INITS = ("mean", "period")


@METHODS.register("anllm")
@dataclass
class AnLLM(AnchorMethod):
    name: ClassVar[str] = "anllm"

    variant: str = "ac"
    ep_anchors: str = "period"
    ac_token: str = "<AC>"
    ac_init: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        for key, value, valid in (
            ("variant", self.variant, VARIANTS),
            ("ep_anchors", self.ep_anchors, EP_ANCHORS),
            ("ac_init", self.ac_init, AC_INITS),
        ):
            if value not in valid:
                raise ConfigError(f"method.{key} of method=anllm must be one of {', '.join(valid)}; got '{value}'")

    def find_anchor_ids(self, model, tokenizer) -> list[int]:
        if self.variant == "ep":
            if self.ep_anchors == "period":  # the token itself, so SentencePiece's "▁." is not one
                return [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))) if t == "."]
            return tokens_decoding_to(tokenizer, lambda text: text.rstrip().endswith("."))
        ac_id = add_anchor_token(model, tokenizer, self.ac_token, self.ac_init)
        self.hidden_token_ids = frozenset({ac_id})
        return [ac_id]

    def insert_anchors(self, text: str) -> str:
        return insert_after_sentences(text, self.ac_token) if self.variant == "ac" else text
