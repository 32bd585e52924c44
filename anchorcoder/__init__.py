"""anchorcoder: KV-cache compression for code LLMs, measured next to pass@k."""

__version__ = "0.1.0"
