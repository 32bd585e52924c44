"""Evaluate a model + KV method on a benchmark: python eval.py [overrides]  (see configs/eval.yaml)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    from anchorcoder.cli import reported_errors
    from anchorcoder.evaluation import run_eval

    with reported_errors():  # a config error: its message alone, exit 2; Ctrl-C: the resume line, exit 130
        metrics = run_eval(cfg, output_dir=HydraConfig.get().runtime.output_dir)
    return metrics["kv/reduction_final"]


if __name__ == "__main__":
    main()
