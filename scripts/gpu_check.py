"""Check that the GPU code paths work on this CUDA device, with numbers.

Four parts, each a function below; a part (or one of its cases) that raises becomes an ``error`` row
and the others still run. Exit status: 1 when any row is ``error`` or ``FAIL``; 2 when there is no
CUDA device (and no ``--dry-run``).

1. ``engine``     our GenerationEngine against ``model.generate``, greedy, EOS ignored, on HumanEval
                  prompts: identical tokens? (bf16 argmax ties on random weights may flip a token: a
                  ``warn`` row with the first mismatch; in fp32 any mismatch is a ``FAIL``) and tokens/s
                  of both at batch 1 and 16, 64 new tokens (``--new-tokens``). Random weights, bf16: the real CodeLlama-7B shape (32
                  layers, hidden 4096, 32 heads, 32 KV heads) and the SmolLM2-135M shape (30 layers, hidden
                  576, 9 heads, 3 KV heads). Both use SmolLM2's tokenizer, so the vocabulary is 49,152
                  (CodeLlama's is 32,016: the random model source sets vocab_size to the tokenizer's).
2. ``methods``    ``anchorcoder.api.evaluate`` of every registered KV method on HumanEval (2 problems,
                  16 new tokens, SmolLM2 shape): pass@1, KV reduction (final, peak), decode tokens/s and
                  CUDA peak memory of prefill and decode. kvpress is skipped when it is not installed.
3. ``training``   anllm and anchorcoder, LoRA (7B shape) and full weights (SmolLM2 shape):
                  - ``trainer``: ``run_train``, the real HF Trainer loop (SDPA), a few steps (it builds
                    the model on the CPU first: the 7B needs ~14 GB of host memory there);
                  - ``trainer flex``: the same with ``trainer.attention=flex`` (full weights, SmolLM2 shape);
                  - ``step sdpa`` / ``step flex``: the same batch through ``masked_forward`` + backward +
                    AdamW, with the model on SDPA and on FlexAttention (the method's BlockMask), the
                    model built on the GPU directly (so the 7B LoRA needs no host copy).
                    anchorcoder runs the flex rows with method.laa=false: LAA reshapes attention, which a
                    BlockMask cannot express.
                  tokens/s and peak memory (CUDA max allocated; on CPU the growth of the resident set).
4. ``deepspeed``  ``run_train`` with deepspeed=zero2, SmolLM2 shape, full weights, in a child process
                  (DeepSpeed sets up a process group and its environment for the whole process).

Run:

    python scripts/gpu_check.py                    # the full check on the CUDA device (several minutes)
    make gpu-check                                 # the same
    python scripts/gpu_check.py --parts engine methods --new-tokens 128
    python scripts/gpu_check.py --dry-run          # the same code paths on CPU: tiny-llama, fp32, < 1 min

``--dry-run`` always runs on CPU: the tiny-llama config (2 layers, GQA), batch 1 and 2, 8 new tokens,
1 HumanEval problem, one training step each, anllm only; FlexAttention rows are skipped there
(torch's FlexAttention has no backward on CPU) and so is DeepSpeed (it needs CUDA).

Prints a table and writes ``outputs/gpu_check/gpu_check_<time>.json`` (``--out``): the device, the
versions, and every row's numbers; what the library printed meanwhile goes to the ``.log`` beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from anchorcoder.api import compose, evaluate
from anchorcoder.generation.reference import engine_generate, first_mismatch, hf_generate, humaneval_prompts, timed
from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import masked_forward
from anchorcoder.models import load_model
from anchorcoder.registry import METHODS
from anchorcoder.reporting.memory import peak_rss_growth
from anchorcoder.training import run_train
from anchorcoder.training.data import PackedCollator, load_documents, pack_documents
from anchorcoder.training.trainer import _wrap_lora

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("engine", "methods", "training", "deepspeed")
NO_CUDA = "no CUDA device: run with --dry-run to check the code paths on CPU"
PART = "(part)"  # the case of a row for a whole part that failed before its cases
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Random-weight shapes, as overrides of configs/model/tiny-llama.yaml (source: random). The vocabulary
# is always the tokenizer's (SmolLM2's, 49,152): the random source sets vocab_size itself.
SHAPES = {
    "tiny": {},  # tiny-llama as it is: 2 layers, hidden 64, 4 query / 2 KV heads
    "smollm2-135m": {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    },
    "codellama-7b": {
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "max_position_embeddings": 16384, "tie_word_embeddings": False,
    },
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """Sizes of every part: the full check, or the dry run's tiny version."""

    engine_shapes: tuple[str, ...]
    batches: tuple[int, ...]  # batch 1 = each of `single_prompts` prompts alone
    single_prompts: int
    new_tokens: int
    methods_shape: str
    limit: int  # HumanEval problems per method
    method_tokens: int
    train_methods: tuple[str, ...]
    lora_shape: str
    full_shape: str
    seq_len: int
    train_batch: int
    warmup_steps: int  # untimed steps before the timed ones (FlexAttention compiles in the first)
    timed_steps: int
    trainer_steps: int  # run_train's max_steps; tokens/s is that of the last step


FULL = Settings(
    engine_shapes=("codellama-7b", "smollm2-135m"), batches=(1, 16), single_prompts=4, new_tokens=64,
    methods_shape="smollm2-135m", limit=2, method_tokens=16, train_methods=("anllm", "anchorcoder"),
    lora_shape="codellama-7b", full_shape="smollm2-135m", seq_len=512, train_batch=2, warmup_steps=1,
    timed_steps=3, trainer_steps=3,
)  # fmt: skip
DRY = Settings(
    engine_shapes=("tiny",), batches=(1, 2), single_prompts=2, new_tokens=8, methods_shape="tiny", limit=1,
    method_tokens=8, train_methods=("anllm",), lora_shape="tiny", full_shape="tiny", seq_len=128, train_batch=2,
    warmup_steps=0, timed_steps=1, trainer_steps=1,
)  # fmt: skip

# methods whose step rows need a change for FlexAttention to apply (see the module docstring)
STEP_METHOD_OVERRIDES = {"anchorcoder": ["method.laa=false"]}


@dataclass
class Row:
    part: str
    case: str
    result: str  # ok | warn (bf16 token flips) | FAIL (a check failed) | error (it raised) | skipped
    numbers: dict = field(default_factory=dict)
    note: str = ""
    seconds: float | None = None
    traceback: str | None = None


@dataclass
class Check:
    """What every part needs: sizes, device, a scratch folder, and the log the library's output goes to."""

    settings: Settings
    device: str  # cuda | cpu
    work: Path
    log: object  # an open text file


# ---------------------------------------------------------------------------- helpers
def model_overrides(shape: str) -> list[str]:
    name = "tiny-llama" if shape == "tiny" else f"random-{shape}"
    arch = [f"model.architecture.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in SHAPES[shape].items()]
    return ["model=tiny-llama", f"model.name={name}", *arch]


def random_model(model_cfg: dict, device: str):
    """A random-weights model config loaded with its weights drawn on ``device`` itself: the random
    source builds the model where torch's default device is (a 7B in bf16 would otherwise take 13.5 GB
    of host memory, and a CPU's time to initialise, before being copied to the GPU)."""
    with torch.device(device):
        return load_model(model_cfg, device)


def measured(fn, device: str):
    """``(fn(), memory numbers)``: the CUDA allocator's peak, or on CPU the resident set's growth."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, {"cuda_peak_bytes": torch.cuda.max_memory_allocated()}
    result, growth = peak_rss_growth(fn)
    return result, {"rss_growth_bytes": growth}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def say(text: str) -> None:
    print(text, file=sys.__stdout__, flush=True)


def run_case(check: Check, part: str, case: str, fn) -> list[Row]:
    """``fn()`` (a Row or a list of them), with the library's output sent to the log; an exception
    becomes an ``error`` row with its traceback."""
    if case != PART:
        say(f"  {part}: {case}")
    print(f"\n===== {part}: {case}", file=check.log, flush=True)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(check.log), contextlib.redirect_stderr(check.log):
            out = fn()
        rows = out if isinstance(out, list) else [out]
    except Exception as err:
        trace = traceback.format_exc()
        print(trace, file=check.log, flush=True)
        message = " ".join(str(err).split()) or type(err).__name__
        rows = [Row(part, case, "error", note=f"{type(err).__name__}: {message}"[:300], traceback=trace)]
    finally:
        free_memory()
    for row in rows:
        if row.seconds is None and case != PART:
            row.seconds = time.perf_counter() - start
        row.seconds = None if row.seconds is None else round(row.seconds, 2)
    return rows


# ---------------------------------------------------------------------------- 1. engine
def check_engine(check: Check) -> list[Row]:
    s = check.settings
    texts = humaneval_prompts(max(s.single_prompts, *s.batches))
    rows = []
    for shape in s.engine_shapes:
        rows += run_case(check, "engine", shape, partial(engine_case, check, shape, texts))
    return rows


def engine_case(check: Check, shape: str, texts: list[str]) -> list[Row]:
    s = check.settings
    loaded = random_model(compose(*model_overrides(shape))["model"], check.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [tokenizer(t).input_ids for t in texts]
    exact = loaded.info["dtype"] == "float32"  # in fp32 the two must agree token for token
    rows = []
    with torch.inference_mode():
        for batch in s.batches:
            groups = [[p] for p in prompts[: s.single_prompts]] if batch == 1 else [prompts[:batch]]
            engine_generate(model, tokenizer, groups[0], 2)  # warm-up at this batch size
            hf_generate(model, tokenizer, groups[0], 2)
            ours, t_ours = generate_groups(engine_generate, model, tokenizer, groups, s.new_tokens)
            ref, t_ref = generate_groups(hf_generate, model, tokenizer, groups, s.new_tokens)
            tokens = len(ours) * s.new_tokens
            mismatch = first_mismatch(ours, ref)
            numbers = {
                "identical_rows": sum(a == b for a, b in zip(ours, ref, strict=True)), "rows": len(ours),
                "first_mismatch": None if mismatch is None else {"row": mismatch[0], "token": mismatch[1]},
                "ours_tok_s": tokens / t_ours, "generate_tok_s": tokens / t_ref, "ratio": t_ref / t_ours,  # > 1: ours faster
                "dtype": loaded.info["dtype"], "params": loaded.info["parameters"], "new_tokens": s.new_tokens,
            }  # fmt: skip
            result, note = "ok", ""
            if mismatch is not None:
                result = "FAIL" if exact else "warn"
                note = f"row {mismatch[0]} differs from new token {mismatch[1]}" + (
                    "" if exact else f" ({loaded.info['dtype']} argmax near-ties on random weights)"
                )
            rows.append(Row("engine", f"{shape} batch {batch}", result, numbers, note, seconds=t_ours + t_ref))
    return rows


def generate_groups(fn, model, tokenizer, groups: list[list[list[int]]], new_tokens: int):
    """Every group of prompts through ``fn``: (all output rows, total seconds)."""
    rows, seconds = [], 0.0
    for group in groups:
        out, took = timed(fn, model, tokenizer, group, new_tokens)
        rows += out
        seconds += took
    return rows, seconds


# ---------------------------------------------------------------------------- 2. methods
def check_methods(check: Check) -> list[Row]:
    rows = []
    for name in METHODS.names():
        if name == "kvpress" and importlib.util.find_spec("kvpress") is None:
            rows.append(Row("methods", name, "skipped", note="kvpress not installed"))
            continue
        rows += run_case(check, "methods", name, partial(method_case, check, name))
    return rows


def method_case(check: Check, name: str) -> Row:
    s = check.settings
    # a fresh model per method: a method that adds tokens (anllm's <AC>, span's sentinels) changes it
    loaded = random_model(compose(*model_overrides(s.methods_shape))["model"], check.device)
    metrics = evaluate(
        f"method={name}", "benchmark=humaneval", f"benchmark.limit={s.limit}",
        f"generation.max_new_tokens={s.method_tokens}", "logger=none", f"device={check.device}",
        model=loaded, output_dir=check.work / "eval" / name,
    )  # fmt: skip
    numbers = {
        "pass@1": metrics.get("quality/pass@1"),
        "kv_final": metrics.get("kv/reduction_final"),
        "kv_peak": metrics.get("kv/reduction_peak"),
        "decode_tok_s": metrics.get("speed/decode_tokens_per_s"),
        "cuda_prefill_bytes": metrics.get("cuda/prefill_max_allocated_bytes"),
        "cuda_decode_bytes": metrics.get("cuda/decode_max_allocated_bytes"),
    }
    final = numbers["kv_final"]
    if not isinstance(final, float | int) or not 0 <= final <= 1:
        return Row("methods", name, "FAIL", numbers, f"kv/reduction_final={final} is not in [0, 1]")
    if name == "dense" and final != 0:
        return Row("methods", name, "FAIL", numbers, "dense must hold every entry (reduction 0)")
    return Row("methods", name, "ok", numbers)


# ---------------------------------------------------------------------------- 3. training
def train_overrides(check: Check, shape: str, method: str, mode: str, steps: int) -> list[str]:
    """A short run_train config: `steps` steps, no warm-up of the learning rate, no evaluation, a few
    stdlib files packed into rows of the check's length."""
    s = check.settings
    return [
        *model_overrides(shape), f"method={method}", f"trainer={mode}", "logger=none", f"device={check.device}",
        f"trainer.max_steps={steps}", "trainer.logging_steps=1", "trainer.eval_steps=0", "trainer.warmup_steps=0",
        "trainer.save_steps=1000", f"trainer.batch_size={s.train_batch}", "data.max_documents=4",
        "data.validation_fraction=0", "data.mbpp_train=false", f"data.seq_len={s.seq_len}",
    ]  # fmt: skip


def check_training(check: Check) -> list[Row]:
    s, rows = check.settings, []
    for method in s.train_methods:
        for mode, shape in (("lora", s.lora_shape), ("full", s.full_shape)):
            case = f"{method} {mode} {shape}: trainer"
            overrides = train_overrides(check, shape, method, mode, s.trainer_steps)
            rows += run_case(check, "training", case, partial(trainer_case, check, overrides, case))
            if mode == "full":  # the trainer on FlexAttention (trainer.attention=flex): the small shape only
                case = f"{method} {mode} {shape}: trainer flex"
                if check.device == "cpu":
                    rows.append(Row("training", case, "skipped", note="FlexAttention has no backward on CPU"))
                else:
                    flex = [*overrides, "trainer.attention=flex", *STEP_METHOD_OVERRIDES.get(method, [])]
                    rows += run_case(check, "training", case, partial(trainer_case, check, flex, case))
            step_overrides = [*train_overrides(check, shape, method, mode, 1), *STEP_METHOD_OVERRIDES.get(method, [])]
            for attn in ("sdpa", "flex_attention"):
                case = f"{method} {mode} {shape}: step {attn.removesuffix('_attention')}"
                if attn == "flex_attention" and check.device == "cpu":
                    rows.append(Row("training", case, "skipped", note="FlexAttention has no backward on CPU"))
                    continue
                rows += run_case(check, "training", case, partial(step_case, check, step_overrides, attn, case))
    return rows


def trainer_run(overrides: list[str], out_dir: Path, device: str) -> dict:
    """``run_train`` on a composed train config: tokens/s of its last logged step, memory, loss."""
    cfg = compose(*overrides, task="train")
    metrics, memory = measured(lambda: run_train(cfg, out_dir), device)
    log = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [entry for entry in log if "tokens_per_s" in entry]
    return {
        "tok_s": steps[-1]["tokens_per_s"], "loss": metrics["train_loss"], "steps": metrics["steps"], **memory,
        "engine": metrics["engine"], "train_s": metrics["train_seconds"],
    }  # fmt: skip


def trainer_case(check: Check, overrides: list[str], case: str) -> Row:
    out_dir = check.work / "train" / case.replace(" ", "_").replace(":", "")
    numbers = trainer_run(overrides, out_dir, check.device)
    ok = numbers["steps"] == check.settings.trainer_steps and math.isfinite(numbers["loss"]) and numbers["tok_s"] > 0
    return Row("training", case, "ok" if ok else "FAIL", numbers, "" if ok else "wrong step count or loss")


def training_batch(cfg: dict, method, tokenizer, device: str) -> dict:
    """The first rows run_train would feed: the config's documents under the method's encoding, packed."""
    documents, _ = load_documents(cfg["data"])
    rows = pack_documents(documents, method, tokenizer, cfg["data"]["seq_len"])[: cfg["trainer"]["batch_size"]]
    batch = PackedCollator(tokenizer.pad_token_id, method.training_labels)(rows)
    return {key: value.to(device) for key, value in batch.items()}


def step_case(check: Check, overrides: list[str], attn: str, case: str) -> Row:
    """Optimizer steps through masked_forward, set up as run_train sets up its model: LoRA on bf16
    weights, full fine-tuning on fp32 weights, bf16 autocast on CUDA."""
    s, cuda = check.settings, check.device == "cuda"
    cfg = compose(*overrides, task="train")
    mode = cfg["trainer"]["name"]
    loaded = random_model({**cfg["model"], "dtype": "bfloat16" if cuda and mode == "lora" else "float32"}, check.device)
    method = build_method(cfg["method"])
    method.prepare(loaded.model, loaded.tokenizer)
    model = loaded.model
    model.set_attn_implementation(attn)  # transformers compiles flex_attention on its first call
    model.train()
    model.config.use_cache = False
    if mode == "lora":
        model = _wrap_lora(model, cfg, method)
    batch = training_batch(cfg, method, loaded.tokenizer, check.device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg["trainer"]["learning_rate"]
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def step() -> float:
        with autocast:
            out = masked_forward(
                model, method, batch["input_ids"], batch["padding_mask"], prompt_lengths=batch["prompt_lengths"],
                doc_ids=batch["doc_ids"], labels=batch["labels"],
            )  # fmt: skip
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    def steps():
        warm = [step() for _ in range(s.warmup_steps)]
        timed_losses, seconds = timed(lambda: [step() for _ in range(s.timed_steps)])
        return warm + timed_losses, seconds

    (losses, seconds), memory = measured(steps, check.device)
    flex = attn == "flex_attention" and not method.reshapes_attention
    numbers = {
        "tok_s": int(batch["padding_mask"].sum()) * s.timed_steps / seconds, "loss": losses[-1], **memory,
        "mask": "BlockMask" if flex else "boolean", "dtype": loaded.info["dtype"],
        "tokens": tuple(batch["input_ids"].shape),
    }  # fmt: skip
    ok = all(math.isfinite(x) for x in losses)
    return Row("training", case, "ok" if ok else "FAIL", numbers, "" if ok else f"non-finite loss {losses}")


# ---------------------------------------------------------------------------- 4. deepspeed
def check_deepspeed(check: Check) -> list[Row]:
    s = check.settings
    case = f"zero2 anllm full {s.full_shape}"
    if check.device != "cuda":
        return [Row("deepspeed", case, "skipped", note="needs CUDA")]
    if importlib.util.find_spec("deepspeed") is None:
        return [Row("deepspeed", case, "skipped", note="deepspeed not installed")]
    overrides = [*train_overrides(check, s.full_shape, "anllm", "full", s.trainer_steps), "deepspeed=zero2"]
    return run_case(check, "deepspeed", case, partial(deepspeed_case, check, overrides, case))


def deepspeed_case(check: Check, overrides: list[str], case: str) -> Row:
    """run_train under DeepSpeed in a child process (this script with --train-child): DeepSpeed's
    process group and environment variables would stay in this one."""
    result_file = check.work / "deepspeed" / "result.json"
    result_file.parent.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}  # the child sets its own
    child = subprocess.run(
        [sys.executable, __file__, "--train-child", str(result_file), "--", *overrides],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    print(child.stdout, child.stderr, sep="\n", file=check.log)
    if child.returncode != 0:
        last = [line for line in child.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"the child run exited with {child.returncode}: {last[0]}")
    numbers = json.loads(result_file.read_text())
    ok = numbers["engine"] == "DeepSpeedEngine" and math.isfinite(numbers["loss"])
    return Row("deepspeed", case, "ok" if ok else "FAIL", numbers, "" if ok else f"engine {numbers['engine']}")


# ---------------------------------------------------------------------------- report
def environment(device: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "host": platform.node(),
    }
    return info | {name: installed(name) for name in ("torch", "transformers", "peft", "accelerate", "deepspeed")}


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, tuple | list):
        return "x".join(str(v) for v in value)
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


TABLE_SKIPS = ("rows", "first_mismatch", "params", "new_tokens", "tokens", "train_s")  # in the JSON only (and notes)


def show_numbers(numbers: dict) -> str:
    parts = []
    for key, value in numbers.items():
        if key in TABLE_SKIPS:
            continue
        if key == "identical_rows":
            parts.append(f"identical={value}/{numbers['rows']}")
        elif key.endswith("_bytes") and isinstance(value, int):
            parts.append(f"{key.removesuffix('_bytes')}={value / 2**30:.2f} GiB")
        else:
            parts.append(f"{key}={show(value)}")
    return " ".join(parts)


STYLES = {"ok": "green", "warn": "yellow", "FAIL": "bold red", "error": "red", "skipped": "dim"}


def print_rows(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_lines=False)
    for column in ("part", "case", "result", "numbers", "note"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            r.part, r.case, Text(r.result, style=STYLES[r.result]), Text(show_numbers(r.numbers)), Text(r.note)
        )
    Console(file=sys.__stdout__, width=max(160, Console().width)).print(table)


# ---------------------------------------------------------------------------- entry points
def train_child(result_file: str, overrides: list[str]) -> None:
    """The deepspeed part's child: one run_train, its numbers written to ``result_file``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    numbers = trainer_run(overrides, Path(result_file).parent / "run", device)
    Path(result_file).write_text(json.dumps(numbers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, fp32, on CPU")
    parser.add_argument("--out", type=Path, help="the JSON report (default outputs/gpu_check/gpu_check_<time>.json)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    parser.add_argument("--new-tokens", type=int, help="new tokens per row in the engine part (64; dry run 8)")
    parser.add_argument("--train-child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_child:
        train_child(args.train_child, args.overrides)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2

    settings = DRY if args.dry_run else FULL
    if args.new_tokens is not None:
        if args.new_tokens < 1:
            parser.error("--new-tokens must be >= 1")
        settings = replace(settings, new_tokens=args.new_tokens)
    device = "cpu" if args.dry_run else "cuda"
    out = args.out or ROOT / "outputs" / "gpu_check" / f"gpu_check_{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    env = environment(device)
    say(f"gpu_check{' --dry-run' if args.dry_run else ''} on {env['device_name']}: {', '.join(args.parts)}")
    say(f"  (library output: {log_path})")

    parts = {"engine": check_engine, "methods": check_methods, "training": check_training, "deepspeed": check_deepspeed}
    started, rows = time.perf_counter(), []
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        check = Check(settings, device, Path(work), log)
        for name in (p for p in PARTS if p in args.parts):
            say(f"{name}:")
            rows += run_case(check, name, PART, partial(parts[name], check))
    failed = [r for r in rows if r.result in ("error", "FAIL")]
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "dry_run": args.dry_run, "parts": args.parts,
        "settings": asdict(settings), "environment": env, "seconds": round(time.perf_counter() - started, 1),
        "failed": len(failed), "rows": [asdict(r) for r in rows],
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    title = f"gpu_check on {env['device_name']} ({env['device']}, torch {env['torch']}, CUDA {env['cuda'] or '-'})"
    print_rows(rows, title)
    say(f"{len(rows)} rows, {len(failed)} failed, {report['seconds']} s; written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
