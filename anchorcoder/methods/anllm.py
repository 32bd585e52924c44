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

import torch

from anchorcoder.methods.anchors import AnchorMethod
from anchorcoder.methods.sentences import insert_after_sentences
from anchorcoder.registry import METHODS, ConfigError

VARIANTS = ("ep", "ac")
EP_ANCHORS = ("period", "period_end")
AC_INITS = ("mean", "period")


def tokens_decoding_to(tokenizer, accept) -> list[int]:
    """Ids whose decoded text satisfies ``accept`` (a vocabulary scan; added tokens included)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if accept(text)]


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


def add_anchor_token(model, tokenizer, token: str, init: str) -> int:
    """Id of ``token``, added to the tokenizer and the model's embeddings if new.

    A new row starts as the mean of the embedding matrix (``init=mean``) or a copy of the ``"."`` row
    (``init=period``); an untied output embedding gets the same treatment. A token the tokenizer
    already has (a fine-tuned checkpoint) keeps its trained rows.
    """
    existing = tokenizer.convert_tokens_to_ids(token)
    if existing is not None and existing != tokenizer.unk_token_id:
        if existing >= model.get_input_embeddings().weight.shape[0]:
            raise ConfigError(f"the tokenizer has {token} (id {existing}) but the model's embeddings are smaller")
        return existing
    period = tokenizer.convert_tokens_to_ids(".")
    if init == "period" and (period is None or period == tokenizer.unk_token_id):
        raise ConfigError('method.ac_init=period needs a "." token in the vocabulary; use ac_init=mean')
    tokenizer.add_tokens([token], special_tokens=True)
    new_id = tokenizer.convert_tokens_to_ids(token)
    if new_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(max(len(tokenizer), new_id + 1), mean_resizing=False)
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not matrices[0]:
            matrices.append(output.weight)
        for weight in matrices:
            rows = weight[:new_id]
            weight[new_id] = rows.mean(dim=0) if init == "mean" else weight[period]
    return new_id
