"""KV-compression methods; importing this package registers them all."""

from anchorcoder.methods import anchorcoder, anllm, dense, eviction, kvpress_bridge, span  # noqa: F401
from anchorcoder.methods.base import KVMethod, StepInfo, build_method  # noqa: F401
