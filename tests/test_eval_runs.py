"""Configs compose and validate; eval runs write their files; bad input is refused before loading."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT, compose_config, wandb_records

from anchorcoder.evaluation import run_eval, validate
from anchorcoder.registry import ConfigError

TINY_RUN = ["model=tiny-llama", "logger=none", "benchmark.limit=2", "generation.max_new_tokens=8"]
METRIC_KEYS = [
    "kv/bytes_final_mean",
    "kv/bytes_peak_max",
    "kv/dense_bytes_final_mean",
    "kv/reduction_final",
    "kv/reduction_peak",
    "speed/prefill_s_mean",
    "speed/decode_tokens_per_s",
    "speed/wall_s",
    "n_samples",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_validates(model):
    validate(compose_config(overrides=[f"model={model}"]))


@pytest.mark.parametrize("group", ["method", "benchmark", "logger", "generation"])
def test_every_group_option_validates(group):
    for option in options(group):
        cfg = compose_config(overrides=[f"{group}={option}"])
        if option == "kvpress" and importlib.util.find_spec("kvpress") is None:
            with pytest.raises(ConfigError, match="make install-kvpress"):  # its own environment
                validate(cfg)
            continue
        validate(cfg)


def test_bad_values_name_their_key():
    with pytest.raises(ConfigError, match=r"benchmark.limit"):
        validate(compose_config(overrides=["benchmark.limit=0"]))
    with pytest.raises(ConfigError, match=r"Unknown method 'nope'.*Valid: anchorcoder, anllm, dense"):
        validate(compose_config(overrides=["method.name=nope"]))
    with pytest.raises(ConfigError, match=r"method.window"):
        validate(compose_config(overrides=["+method.window=3"]))
    with pytest.raises(ConfigError, match=r"model.prompt_style"):
        validate(compose_config(overrides=["model.prompt_style=poetry"]))


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_folders(tmp_path: Path) -> list[str]:
    return [p for p in glob.glob(str(tmp_path / "outputs" / "**" / "*"), recursive=True) if os.path.isfile(p)]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method=nope", r"Available options in 'method'"),
        ("model=nope", r"Available options in 'model'"),
        ("benchmark=nope", r"Available options in 'benchmark'"),
        ("benchmark.limit=-1", r"benchmark.limit must be a positive integer"),
        ("model=codellama-7b model.path=/nonexistent/model", r"model.path '/nonexistent/model' is not a model folder"),
    ],
)
def test_bad_input_fails_before_loading_and_leaves_no_run(tmp_path, override, expected):
    result = run_cli(tmp_path, *override.split(), "logger=none")
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert __import__("re").search(expected, message), message
    if "Available options" in expected:
        assert "dense" in message or "smollm2-135m" in message or "humaneval" in message
    assert "Loading weights" not in message and "Converting" not in message
    assert run_folders(tmp_path) == []  # nothing that looks like a run, finished or not


def test_eval_run_writes_files_and_metrics(tmp_path):
    metrics = run_eval(compose_config(overrides=TINY_RUN), tmp_path)
    for key in METRIC_KEYS:
        assert key in metrics
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    lines = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [x["task_id"] for x in lines] == ["HumanEval/0", "HumanEval/1"]
    assert metrics["n_samples"] == 2 and metrics["kv/reduction_final"] == 0.0
    assert "model:" in (tmp_path / "config.yaml").read_text()
    assert json.loads((tmp_path / "run_info.json").read_text())["model"]["num_kv_heads"] == 2


def test_anllm_ac_eval_run_compresses_and_hides_its_token(tmp_path):
    """method=anllm end to end: <AC> in the prompts' ids, never in the text; the cache measured smaller."""
    metrics = run_eval(
        compose_config(overrides=[*TINY_RUN, "method=anllm", "method.variant=ac", "generation.batch_size=2"]), tmp_path
    )
    lines = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    ac = 49152  # appended to SmolLM2's 49,152-token vocabulary
    assert all(ac in x["prompt_token_ids"] for x in lines)
    assert all("<AC>" not in x["text"] and "<AC>" not in x["completion"] for x in lines)
    assert 0.0 < metrics["kv/reduction_final"] < 1.0 and metrics["kv/reduction_peak"] >= 0.0


def test_code_ppl_feeds_inserted_anchors_but_scores_only_the_code(tmp_path):
    """code_ppl under AnLLM-AC: the target carries <AC> where encode puts it (as a trained model would
    emit it); the scored tokens and their count are the dense run's."""
    ppl = [*TINY_RUN, "benchmark=code_ppl", "benchmark.sources=[humaneval]", "generation.batch_size=2"]
    dense = run_eval(compose_config(overrides=ppl), tmp_path / "dense")
    anllm = run_eval(compose_config(overrides=[*ppl, "method=anllm", "method.variant=ac"]), tmp_path / "ac")
    assert anllm["quality/target_tokens"] == dense["quality/target_tokens"]
    lines = [json.loads(x) for x in (tmp_path / "ac" / "generations.jsonl").read_text().splitlines()]
    assert all(49152 in x["token_ids"] for x in lines)  # <AC> was fed inside the targets
    assert anllm["quality/ppl"] != dense["quality/ppl"] and anllm["kv/reduction_final"] > 0


def test_anchorcoder_eval_run_checks_against_the_rule(tmp_path, tiny):
    """method=anchorcoder end to end (TAA + LAA + MHPE): every sample's recorded entries equal what the
    rule keeps (first token, past line anchors, the open line) for the tokens it fed."""
    from anchorcoder.methods.anchors import kept_count

    overrides = [*TINY_RUN, "method=anchorcoder", "method.mhpe=true", "generation.batch_size=2"]
    metrics = run_eval(compose_config(overrides=overrides), tmp_path)
    texts = tiny.tokenizer.batch_decode([[i] for i in range(len(tiny.tokenizer))])
    newline_ids = {i for i, text in enumerate(texts) if "\n" in text}
    for line in (tmp_path / "generations.jsonl").read_text().splitlines():
        x = json.loads(line)
        fed = x["prompt_token_ids"] + x["token_ids"]
        fed = fed if x["finish_reason"] == "eos" else fed[:-1]  # the last sampled token is never fed
        kept = kept_count([t in newline_ids for t in fed], sink_tokens=1)
        assert x["kv"]["entries_final"] == kept * 2 * 2  # x layers x KV heads of the tiny model
    assert 0.5 < metrics["kv/reduction_final"] < 1.0

    # scripts/check_anchor_kv.py agrees with the record, and its --rule path with its own check
    spec = importlib.util.spec_from_file_location("check_anchor_kv", ROOT / "scripts" / "check_anchor_kv.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    recorded = script.check(tmp_path)
    assert recorded["samples"] == 2 and recorded["mismatches"] == []
    assert recorded["reduction_final"] == pytest.approx(metrics["kv/reduction_final"], abs=1e-9)
    assert recorded["reduction_peak"] == pytest.approx(metrics["kv/reduction_peak"], abs=1e-9)
    assert script.check(tmp_path, rule=["method=anchorcoder"]) == recorded
    whole = script.check(tmp_path, rule=["method=anchorcoder", "method.compress_prompt=false"])
    assert whole["reduction_final"] < recorded["reduction_final"]


def test_local_pretrained_folder_loads_like_a_hub_model(tmp_path, tiny):
    """The hub code path (model.source=pretrained), fed a folder written by save_pretrained."""
    folder = tmp_path / "tiny-saved"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    local = run_eval(
        compose_config(overrides=[*TINY_RUN, "model=qwen2.5-coder-1.5b", f"model.path={folder}"]), tmp_path / "local"
    )
    random = run_eval(compose_config(overrides=TINY_RUN), tmp_path / "random")
    # model.device_map=auto: placed by accelerate (here every layer on the CPU, the only device)
    overrides = [*TINY_RUN, "model=qwen2.5-coder-1.5b", f"model.path={folder}", "model.device_map=auto"]
    placed = run_eval(compose_config(overrides=overrides), tmp_path / "placed")
    texts = [
        [json.loads(x)["token_ids"] for x in (tmp_path / d / "generations.jsonl").read_text().splitlines()]
        for d in ("local", "random", "placed")
    ]
    assert texts[0] == texts[1] == texts[2]  # same weights, same tokens
    assert local["kv/bytes_final_mean"] == random["kv/bytes_final_mean"] == placed["kv/bytes_final_mean"]
    # one device: transformers records no placement (on several GPUs: modules per device)
    assert json.loads((tmp_path / "placed" / "run_info.json").read_text())["model"]["device_map"] is None


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [x for x in TINY_RUN if not x.startswith("logger")] + ["logger=wandb", "logger.mode=offline"]
    metrics = run_eval(compose_config(overrides=overrides), tmp_path)
    [run_file] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    summary, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    for key in METRIC_KEYS:
        assert summary[key] == pytest.approx(metrics[key])
    assert config["model"]["name"] == "tiny-llama" and config["method"]["name"] == "dense"
    assert summary["samples/nrows"] == 2  # the table of per-sample results
    assert summary["quality/pass@1"] == metrics["quality/pass@1"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matched_bytes_sets_the_eviction_ratio_from_the_measured_reduction():
    matched = load_script("matched_bytes")
    # 28 of 30 layers compressed: removing 0.7 of all bytes takes 0.75 of each compressed layer's
    assert matched.eviction_ratio(0.7, 30, 2) == 0.75
    assert matched.eviction_ratio(0.7, 30, 0) == 0.7
    assert matched.eviction_ratio(0.98, 30, 2) == 0.99  # capped below 1
    with pytest.raises(SystemExit, match="skip_layers holds all 2 layers"):
        matched.eviction_ratio(0.5, 2, 2)
    assert matched.skipped_layers(["method=l2norm"]) == 2
    assert matched.skipped_layers(["method=streamingllm", "method.skip_layers=[]"]) == 0


def test_every_matched_bytes_run_is_a_valid_eval_config():
    matched = load_script("matched_bytes")
    methods = [["method=dense"], ["method=span"], *matched.ANCHOR_METHODS.values()]
    methods += [
        [f"method={m}", "method.schedule=every_step", "method.compression_ratio=0.75"] for m in matched.EVICTION_METHODS
    ]
    for bench, setting in matched.BENCHMARKS.items():
        for method in methods:
            cfg = compose_config("eval", [*setting, *method])
            validate(cfg)
            assert cfg["benchmark"]["name"] == bench
