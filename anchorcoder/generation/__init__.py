"""The generation engine, its KV cache and the attention that honours it."""

from anchorcoder.generation.cache import KVCache  # noqa: F401
from anchorcoder.generation.engine import GenerationEngine, GenerationSettings, SampleResult  # noqa: F401
