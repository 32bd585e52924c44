"""Scaling out: data-parallel eval under torchrun (gloo, CPU processes), resume at any world size,
and sweeps through the submitit launcher. Every run here is a real eval.py run on the tiny GQA model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config

from anchorcoder.generation.engine import RunStats
from anchorcoder.models import check_model_config
from anchorcoder.registry import ConfigError
from anchorcoder.reporting import kv_and_speed_metrics

ROOT = Path(__file__).resolve().parents[1]
RUN = ["model=tiny-llama", "logger=none", "benchmark.limit=5", "generation.max_new_tokens=12"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    return {**env, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}  # one thread per process, as torchrun sets


def evaluate(out: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command = [*(launch if processes > 1 else [sys.executable]), "eval.py", *RUN, *overrides, f"hydra.run.dir={out}"]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def samples(out: Path) -> dict:
    lines = (out / "generations.jsonl").read_text().splitlines()
    return {(r["task_id"], r["sample_index"]): r for r in map(json.loads, lines)}


def verdicts(out: Path) -> dict:
    return {r["task_id"]: (r["passed"], r["kv"]) for r in map(json.loads, (out / "results.jsonl").open())}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    evaluate(out, 1)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    evaluate(out, 2)
    return out


def test_two_processes_give_what_one_gives(one_process, two_processes):
    one, two = samples(one_process), samples(two_processes)
    assert len(one) == 5 and one.keys() == two.keys()
    for key in one:  # the same tokens and the same cache records, sample by sample
        assert two[key]["token_ids"] == one[key]["token_ids"] and two[key]["kv"] == one[key]["kv"]
    assert verdicts(two_processes) == verdicts(one_process)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one_process, two_processes))
    for key in ("quality/pass@1", "kv/reduction_final", "kv/reduction_peak", "kv/bytes_peak_max", "n_samples"):
        assert m2[key] == m1[key], key
    assert m1["speed/processes"] == 1 and m2["speed/processes"] == 2
    assert json.loads((two_processes / "run_info.json").read_text())["processes"] == 2
    # rank 0 merged the ranks' logs; rank 1 kept its own timings
    assert not list(two_processes.glob("generations.rank*")) and (two_processes / "engine_stats.rank1.json").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_interrupted_two_process_run_resumes(two_processes, one_process, tmp_path, processes):
    """What an interrupted 2-process run leaves: each rank's log (one with a line torn mid-write),
    no merged log, no metrics. Resumed with 1 or 2 processes, only the missing samples are generated."""
    out = tmp_path / "run"
    shutil.copytree(two_processes, out)
    records = list(samples(out).values())
    (out / "generations.jsonl").unlink()
    (out / "metrics.json").unlink()
    (out / "generations.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[0:2]))
    torn = json.dumps(records[3])[:40]
    (out / "generations.rank1.jsonl").write_text(json.dumps(records[2]) + "\n" + torn)

    evaluate(out, processes)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run/resumed_samples"] == 3  # records 3 and 4 were generated again, the rest not
    resumed = samples(out)
    assert {k: r["token_ids"] for k, r in resumed.items()} == {
        k: r["token_ids"] for k, r in samples(one_process).items()
    }
    assert verdicts(out) == verdicts(one_process)
    assert not list(out.glob("generations.rank*"))


def test_lanes_combine_throughput_and_slowest_wall():
    lane = lambda tokens, decode_s, wall: RunStats(  # noqa: E731
        prefill_s=[0.5],
        prefill_tokens=100,
        decode_s=decode_s,
        decode_tokens=tokens,
        wall_s=wall,
        kv_tensor_bytes_peak=tokens,
    )
    record = {
        "kv": dict.fromkeys(("entries_final", "bytes_final", "bytes_peak", "dense_bytes_final", "dense_bytes_peak"), 1)
    }
    record |= {"prompt_token_ids": [1], "token_ids": [2]}
    metrics = kv_and_speed_metrics([record], [lane(100, 2.0, 3.0), lane(300, 2.0, 4.0)])
    assert metrics["speed/decode_tokens_per_s"] == 50 + 150
    assert metrics["speed/prefill_tokens_per_s"] == 200 + 200
    assert metrics["speed/wall_s"] == 4.0 and metrics["kv/tensor_bytes_peak"] == 300
    assert metrics["speed/processes"] == 2


def test_sweep_under_torchrun_is_refused(tmp_path):
    env = {**_env(), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    done = subprocess.run(
        [sys.executable, "eval.py", "-m", *RUN, "benchmark.limit=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "not torchrun" in done.stderr
    assert not (tmp_path / "sweep").exists()


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    """Two jobs through submitit's local executor, each a data-parallel eval of 2 tasks."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep, launcher = tmp_path / "sweep", ["hydra/launcher=local", "hydra.launcher.tasks_per_node=2"]
    done = subprocess.run(
        [sys.executable, "eval.py", "-m", *launcher, *RUN, "benchmark.limit=1,2", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert [m["n_samples"] for m in metrics] == [1, 2]
    assert [m["speed/processes"] for m in metrics] == [1, 2]  # one sample: rank 1 had nothing to do
    assert list((sweep / ".submitit").iterdir())  # the jobs ran through submitit (their logs are here)
    assert (sweep / "report.md").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=codellama-7b", "model.device_map=everywhere"], "model.device_map must be null or one of auto"),
        (["model=tiny-llama", "model.device_map=auto"], "model.source=random loads on one device"),
    ],
)
def test_bad_device_map_is_refused_before_loading(overrides, expected):

    with pytest.raises(ConfigError, match=expected):
        check_model_config(compose_config(overrides=overrides)["model"])


@pytest.mark.gpu
def test_device_map_over_two_gpus_gives_the_one_gpu_tokens(tmp_path, tiny):
    """A model spread over two GPUs (each layer's cache on its layer's GPU) generates what it does on one;
    a method reading another layer's cache is refused."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from anchorcoder.evaluation import run_eval

    folder = tmp_path / "tiny-saved"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    base = ["logger=none", "benchmark.limit=3", "generation.max_new_tokens=16", "model=qwen2.5-coder-1.5b"]
    base += [f"model.path={folder}", "model.dtype=float32", "model.prompt_style=completion"]
    for method in ("dense", "l2norm", "streamingllm", "anllm"):
        runs = {}
        for name, extra in (("one", ["device=cuda:0"]), ("two", ["model.device_map=balanced"])):
            run_eval(compose_config(overrides=[*base, f"method={method}", *extra]), tmp_path / method / name)
            runs[name] = samples(tmp_path / method / name)
        placed = json.loads((tmp_path / method / "two" / "run_info.json").read_text())["model"]["device_map"]
        assert placed and len(placed) == 2, placed
        assert {k: r["token_ids"] for k, r in runs["two"].items()} == {
            k: r["token_ids"] for k, r in runs["one"].items()
        }
    with pytest.raises(ConfigError, match="another layer's cache"):
        run_eval(compose_config(overrides=[*base, "method=anchorcoder", "model.device_map=balanced"]), tmp_path / "ac")
