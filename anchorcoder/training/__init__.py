"""Training runs (``train.py``): data, the contamination guard, and the Trainer with the methods' masks."""

from anchorcoder.training.trainer import NonFiniteLoss, run_train

__all__ = ["NonFiniteLoss", "run_train"]
