"""Fine-tune a model under a method's training face: python train.py [overrides] (see configs/train.yaml)."""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from anchorcoder.cli import reported_errors
    from anchorcoder.training import run_train

    with reported_errors():  # a config error: its message alone, exit 2; Ctrl-C: the resume line, exit 130
        run_train(cfg, output_dir=HydraConfig.get().runtime.output_dir)


def _take_launcher_arguments() -> None:
    """The ``deepspeed`` launcher appends ``--local_rank=N``, which Hydra would reject: move it to the
    environment (torchrun and accelerate launch already pass ``LOCAL_RANK`` there)."""
    for arg in list(sys.argv[1:]):
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            sys.argv.remove(arg)


if __name__ == "__main__":
    _take_launcher_arguments()
    main()
