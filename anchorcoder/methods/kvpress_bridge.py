"""Run an NVIDIA kvpress press inside our engine, so its cache is measured like every other method's.

kvpress hooks each attention layer and, during prefill, replaces the layer's cache by what the
press's ``compress`` returns. We do the same on our :class:`KVCache`: the press sees the layer's
hidden states, keys, values and forward kwargs, exactly as under ``with press(model):``. Since our
cache tracks the absolute position of every entry, the entries the press kept are located in the
layer's keys (they must be an unchanged subset: presses that merge or quantise are refused) and
kept through :meth:`KVCache.keep`, so the memory is really freed.

kvpress (0.5.x) needs transformers < 5.3: ``make install-kvpress`` builds ``.venv-kvpress`` with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from anchorcoder.methods.base import KVMethod
from anchorcoder.registry import METHODS, ConfigError

if TYPE_CHECKING:  # the engine imports the method contract; avoid the cycle
    from anchorcoder.generation.cache import KVCache

# Short names for the presses most often compared; any kvpress class name (e.g. "TOVAPress") works too.
PRESSES = {
    "knorm": "KnormPress",
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "expected_attention": "ExpectedAttentionPress",
    "tova": "TOVAPress",
    "random": "RandomPress",
    "keydiff": "KeyDiffPress",
    "lagkv": "LagKVPress",
    "pyramidkv": "PyramidKVPress",
}

INSTALL_HINT = (
    "method=kvpress needs the kvpress package, which pins transformers < 5.3: run `make install-kvpress` "
    "and use .venv-kvpress/bin/python (README, 'kvpress bridge')"
)


def kept_index(keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor):
    """Where each kept entry ``[B, H, n, D]`` sits in ``keys`` ``[B, H, S, D]``: indices ``[B, H, n]``, ascending.

    Entries are located by a random projection of their key, then checked exactly (keys and values).
    """
    probe = torch.randn(keys.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probe = probe.to(keys.device)
    sorted_hash, order = (keys.double() @ probe).sort(dim=-1)
    wanted = (new_keys.double() @ probe).contiguous()
    slot = torch.searchsorted(sorted_hash, wanted).clamp(1, keys.shape[-2] - 1)  # BLAS rounding may differ by
    below, above = sorted_hash.gather(-1, slot - 1), sorted_hash.gather(-1, slot)  # shape: take the nearer
    slot = torch.where((wanted - below).abs() <= (above - wanted).abs(), slot - 1, slot)
    found = order.gather(-1, slot)  # in the press's order
    index, perm = found.sort(dim=-1)
    expand = lambda i: i[..., None].expand(-1, -1, -1, keys.shape[-1])  # noqa: E731
    same = torch.equal(keys.gather(2, expand(index)), new_keys.gather(2, expand(perm))) and torch.equal(
        values.gather(2, expand(index)), new_values.gather(2, expand(perm))
    )
    if not same:
        raise ConfigError(
            "the press changed the cached entries (merged or quantised them); the bridge runs presses that keep a subset"
        )
    return index


@METHODS.register("kvpress")
@dataclass
class KVPressBridge(KVMethod):
    """Any kvpress press that selects entries (``ScorerPress`` and kin), applied once after prefill."""

    name: ClassVar[str] = "kvpress"
    handles_padding: ClassVar[bool] = False  # kvpress presses score unpadded rows
    chunked_prefill: ClassVar[bool] = False  # a press compresses the prompt from one prefill forward's states

    press: str = "knorm"
    compression_ratio: float = 0.5
    press_options: dict = field(default_factory=dict)  # other constructor arguments of the press

    def __post_init__(self):
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ConfigError(f"method.compression_ratio must be in [0, 1), got {self.compression_ratio}")
        self._press = self.build_press()  # fails before any model loads when kvpress is missing

    def build_press(self):
        try:
            import kvpress
        except ImportError as error:
            raise ConfigError(INSTALL_HINT) from error
        class_name = PRESSES.get(self.press, self.press)
        press_class = getattr(kvpress, class_name, None)
        if press_class is None or not isinstance(press_class, type):
            raise ConfigError(f"method.press='{self.press}' is not a kvpress press; short names: {', '.join(PRESSES)}")
        return press_class(compression_ratio=self.compression_ratio, **self.press_options)

    def prepare(self, model, tokenizer) -> None:
        self._press.post_init_from_model(model)
        if getattr(model, HOOKED, False):
            return  # one set of hooks per model serves every bridge instance
        backbone = model.model.language_model if hasattr(model.model, "language_model") else model.model
        for layer in backbone.layers:
            layer.self_attn.register_forward_hook(_press_hook, with_kwargs=True)
        setattr(model, HOOKED, True)

    def compress_layer(self, module, args, kwargs, output) -> None:
        """After layer ``module``'s attention during prefill: let the press pick what stays."""
        cache: KVCache = kwargs["kv_cache"]
        layer = module.layer_idx
        keys, values = cache.keys[layer], cache.values[layer]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        new_keys, new_values = self._press.compress(module, hidden, keys, values, output[1], kwargs)
        if new_keys.shape[-2] != keys.shape[-2]:
            cache.observe()  # the full layer existed: count it in the peak before it shrinks
            cache.keep(layer, kept_index(keys, values, new_keys, new_values))


HOOKED = "_anchorcoder_kvpress_hooks"


def _press_hook(module, args, kwargs, output):
    method, cache = kwargs.get("kv_method"), kwargs.get("kv_cache")
    if isinstance(method, KVPressBridge) and cache is not None and cache.phase == "prefill":
        method.compress_layer(module, args, kwargs, output)
    return output
