"""The reference: the full KV cache, nothing removed."""

from dataclasses import dataclass

from anchorcoder.methods.base import KVMethod
from anchorcoder.registry import METHODS


@METHODS.register("dense")
@dataclass
class Dense(KVMethod):
    name = "dense"
