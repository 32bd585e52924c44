"""Training runs (``train.py``).

The trainer (LoRA / full, DeepSpeed, checkpoints) is not built yet; until it is, ``train.py``
checks its config exactly as ``eval.py`` does and then says so, leaving no run folder behind.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from anchorcoder.evaluation.run import discard_unfinished_run_dir
from anchorcoder.methods import build_method
from anchorcoder.models import check_model_config
from anchorcoder.registry import ConfigError, load_all


def run_train(cfg: DictConfig | dict, output_dir: str | Path) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    try:
        load_all()
        check_model_config(container["model"])
        method = build_method(container["method"])
        raise ConfigError(
            f"training (method={method.name}) is not available yet: the trainer is the subject of a later "
            "issue. eval.py works today."
        )
    except ConfigError:
        discard_unfinished_run_dir(Path(output_dir))
        raise
