"""scripts/gpu_check.py: its dry run (CPU, tiny-llama) goes through every part and reports sane numbers;
the full check runs where there is a CUDA device (`pytest -m gpu tests/test_gpu_check.py`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from anchorcoder.registry import METHODS, load_all

SCRIPT = ROOT / "scripts" / "gpu_check.py"
PARTS = ["engine", "methods", "training", "deepspeed"]


def run_check(cwd, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def rows_of(report: dict, part: str) -> list[dict]:
    return [r for r in report["rows"] if r["part"] == part]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """One dry run for the whole module (about 30 s on two cores)."""
    folder = tmp_path_factory.mktemp("gpu_check")
    result = run_check(folder, "--dry-run", "--out", str(folder / "report.json"), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failed" in result.stdout
    return json.loads((folder / "report.json").read_text())


def test_dry_run_covers_every_part_without_errors(dry_run):
    assert dry_run["dry_run"] and dry_run["parts"] == PARTS and dry_run["failed"] == 0
    assert {r["part"] for r in dry_run["rows"]} == set(PARTS)
    assert {r["result"] for r in dry_run["rows"]} <= {"ok", "skipped"}
    env = dry_run["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["transformers"]


def test_engine_tokens_are_identical_in_fp32(dry_run):
    rows = rows_of(dry_run, "engine")
    assert [r["case"] for r in rows] == ["tiny batch 1", "tiny batch 2"]
    for row in rows:
        n = row["numbers"]
        assert row["result"] == "ok" and n["dtype"] == "float32"
        assert n["identical_rows"] == n["rows"] >= 2 and n["first_mismatch"] is None
        assert n["ours_tok_s"] > 0 and n["generate_tok_s"] > 0


def test_every_method_reports_its_kv_reduction(dry_run):
    load_all()
    rows = {r["case"]: r for r in rows_of(dry_run, "methods")}
    assert sorted(rows) == METHODS.names()
    for name, row in rows.items():
        if name == "kvpress" and importlib.util.find_spec("kvpress") is None:
            assert row["result"] == "skipped" and row["note"] == "kvpress not installed"
            continue
        n = row["numbers"]
        assert row["result"] == "ok", row
        assert 0 <= n["kv_final"] <= 1 and n["kv_peak"] <= 1 and n["decode_tok_s"] > 0
        assert n["pass@1"] is not None and n["cuda_prefill_bytes"] is None  # CPU: no CUDA figures
    assert rows["dense"]["numbers"]["kv_final"] == 0 == rows["dense"]["numbers"]["kv_peak"]
    assert rows["anllm"]["numbers"]["kv_final"] > 0  # an anchor method does drop entries


def test_training_rows_have_throughput(dry_run):
    rows = rows_of(dry_run, "training")
    ran = [r for r in rows if r["result"] == "ok"]
    assert {r["case"] for r in ran} == {
        f"anllm {m} tiny: {k}" for m in ("lora", "full") for k in ("trainer", "step sdpa")
    }
    for row in ran:
        assert row["numbers"]["tok_s"] > 0 and row["numbers"]["rss_growth_bytes"] >= 0
    engines = {r["case"]: r["numbers"]["engine"] for r in ran if r["case"].endswith("trainer")}
    assert engines == {
        "anllm lora tiny: trainer": "PeftModelForCausalLM",
        "anllm full tiny: trainer": "LlamaForCausalLM",
    }
    flex = [r for r in rows if "flex" in r["case"]]
    assert len(flex) == 3 and all(r["result"] == "skipped" for r in flex)


def test_deepspeed_is_skipped_without_cuda(dry_run):
    [row] = rows_of(dry_run, "deepspeed")
    assert row["result"] == "skipped" and row["note"] == "needs CUDA"


def test_without_cuda_the_full_check_refuses_in_one_line(tmp_path):
    result = run_check(tmp_path, "--out", str(tmp_path / "report.json"), timeout=120, CUDA_VISIBLE_DEVICES="")
    assert result.returncode != 0
    assert result.stderr.strip() == "no CUDA device: run with --dry-run to check the code paths on CPU"
    assert not (tmp_path / "report.json").exists()


def test_a_case_that_raises_becomes_an_error_row(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up
    spec.loader.exec_module(gpu_check)

    def broken():
        print("library chatter")
        raise ValueError("no such [thing]")

    with open(tmp_path / "log", "w") as log:
        check = gpu_check.Check(gpu_check.DRY, "cpu", tmp_path, log)
        [row] = gpu_check.run_case(check, "methods", "broken", broken)
        [ok] = gpu_check.run_case(check, "methods", "fine", lambda: gpu_check.Row("methods", "fine", "ok"))
    assert row.result == "error" and row.note == "ValueError: no such [thing]" and "in broken" in row.traceback
    assert ok.result == "ok" and ok.seconds is not None
    assert "library chatter" in (tmp_path / "log").read_text()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_check_on_cuda(tmp_path):
    result = run_check(tmp_path, "--out", str(tmp_path / "report.json"), timeout=3600)
    report = json.loads((tmp_path / "report.json").read_text())
    failed = [(r["part"], r["case"], r["note"]) for r in report["rows"] if r["result"] in ("error", "FAIL")]
    assert result.returncode == 0 and not failed, failed or result.stderr[-3000:]
    assert {r["part"] for r in report["rows"]} == set(PARTS)
    engine = {r["case"] for r in rows_of(report, "engine")}
    assert engine == {f"{s} batch {b}" for s in ("codellama-7b", "smollm2-135m") for b in (1, 16)}
    for row in rows_of(report, "methods"):
        if row["result"] != "skipped":
            assert row["numbers"]["cuda_decode_bytes"] > 0
    flex = [r for r in rows_of(report, "training") if "flex" in r["case"]]
    assert flex and all(r["result"] == "ok" for r in flex)
    assert all(r["numbers"]["mask"] == "BlockMask" for r in flex if "step" in r["case"])
    [deepspeed] = rows_of(report, "deepspeed")
    assert deepspeed["result"] == "ok" and deepspeed["numbers"]["engine"] == "DeepSpeedEngine"
