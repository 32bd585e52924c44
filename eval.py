"""Evaluate a model + KV method on a benchmark: python eval.py [overrides]  (see configs/eval.yaml)."""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    from anchorcoder.cli import reported_errors
    from anchorcoder.evaluation import run_eval

    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if in_sweep and cfg.logger.get("group", "absent") is None:  # a sweep's jobs form one W&B group
        with open_dict(cfg):
            cfg.logger.group = Path(hydra_cfg.sweep.dir).name
    # a config error: its message alone, exit 2 (in a sweep: that job fails, the others run); Ctrl-C: exit 130
    with reported_errors(config_error_exits=not in_sweep):
        metrics = run_eval(cfg, output_dir=hydra_cfg.runtime.output_dir)
    return metrics["kv/reduction_final"]


if __name__ == "__main__":
    main()
