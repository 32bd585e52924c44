"""Data-parallel evaluation: one process per device, each generating its share of the samples.

``torchrun --nproc_per_node N eval.py ...`` and ``accelerate launch --multi_gpu --num_processes N
eval.py ...`` start N copies of the run; both set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, which
is all this module reads. A submitit job of several tasks (``hydra/launcher=slurm`` or ``local`` with
``tasks_per_node=N``) gets the same variables from submitit's description of the job.

The processes talk over a gloo process group, also on GPU machines: they exchange only a folder name,
a few barriers and the metrics. So the same code runs as CPU processes under ``torchrun``
(accelerate's own CPU launch starts a single process). Rank K loads its own model replica on
``cuda:<local rank>`` (``device=auto`` on a GPU machine) or on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

# The slowest rank may still be generating (or rank 0 scoring) while the others wait at a barrier.
WAIT_LIMIT = timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def device(self, device: str) -> str:
        """The device this rank loads its replica on: ``auto`` is ``cuda:<local rank>`` where CUDA is."""
        import torch

        if self.parallel and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device


def adopt_submitit_tasks() -> None:
    """In a submitit job of several tasks, set the variables torchrun would have set (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from submitit's description of the job."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launched_ranks() -> Ranks:
    """This process's place among the processes torchrun / accelerate launch / submitit started (1 of 1 otherwise)."""
    adopt_submitit_tasks()
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def start() -> tuple[Ranks, bool]:
    """Join the process group when launched as several processes; returns (ranks, whether we started it)."""
    ranks = launched_ranks()
    if not ranks.parallel or dist.is_initialized():
        return ranks, False
    dist.init_process_group("gloo", timeout=WAIT_LIMIT)
    return ranks, True


def stop(started: bool) -> None:
    if started and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.parallel:
        dist.barrier()


def from_main(ranks: Ranks, value):
    """``value`` as rank 0 has it, on every rank (a picklable object)."""
    if not ranks.parallel:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
