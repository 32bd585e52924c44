"""Evaluation runs (``eval.py``)."""

from anchorcoder.evaluation.run import run_eval, validate  # noqa: F401
