"""anchorcoder: KV-cache compression for code LLMs, measured next to pass@k.

From Python: ``from anchorcoder import compose, load, generate, evaluate`` (see :mod:`anchorcoder.api`).
"""

__version__ = "0.1.0"
__all__ = ["compose", "load", "prepare", "encode", "generate", "evaluate"]


def __getattr__(name: str):  # torch and transformers load on first use, not on `import anchorcoder`
    if name in __all__:
        from anchorcoder import api

        return getattr(api, name)
    raise AttributeError(f"module 'anchorcoder' has no attribute '{name}'")
