"""``train.py``'s job: model + method + data -> a fine-tuned adapter (LoRA) or model (full).

The HF ``Trainer`` runs the loop (DeepSpeed, DDP, checkpoints, resume); :class:`MethodTrainer`
changes one thing, the forward: every batch goes through the method's training face
(:func:`~anchorcoder.methods.anchors.masked_forward`: its anchors, positions and attention mask,
within packed documents). Dense is the control: same data, plain causal mask.

Run folder (Hydra's output dir):

- ``config.yaml``, ``run_info.json``   the resolved config; versions, model revision, data sizes
- ``train_log.jsonl``                  every logged step: loss, lr, grad norm, tokens/s, mask density, eval loss
- ``checkpoint-N/``                    every ``trainer.save_steps`` (adapter or weights, optimizer, data position)
- ``final/``                           the adapter (or model), the tokenizer with its new tokens, ``method.yaml``
- ``metrics.json``                     written last: its presence marks a finished run
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from anchorcoder.methods import KVMethod, build_method
from anchorcoder.methods.anchorcoder import GATE_MODULE
from anchorcoder.methods.anchors import IGNORE_INDEX, AnchorMethod, masked_forward
from anchorcoder.models import check_model_config, load_model, locate_model
from anchorcoder.registry import ConfigError, load_all
from anchorcoder.tracking import Tracker, build_tracker
from anchorcoder.training.data import (
    PackedCollator,
    benchmark_needles,
    check_contamination,
    load_documents,
    pack_documents,
)

log = logging.getLogger(__name__)

MODES = ("lora", "full")
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTION = ("sdpa", "flex")  # trainer.attention
DEEPSPEED = ("none", "zero2", "zero3")
OBJECTIVES = ("ce", "distill", "mix")
FINAL = "final"
METHOD_FILE = "method.yaml"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops before that step updates anything."""


# ---------------------------------------------------------------------------- config
def validate(cfg: dict) -> tuple[KVMethod, Tracker]:
    """Check every name and value of a train config; loads nothing heavy."""
    load_all()
    for key in ("model", "method", "trainer", "data", "deepspeed", "logger"):
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"config key '{key}' is missing; pick one with {key}=<name>")
    check_model_config(cfg["model"])
    method = build_method(cfg["method"])
    if method.name != "dense" and not isinstance(method, AnchorMethod):
        raise ConfigError(
            f"method={method.name} has no training face; train one of: dense (the control), anllm, anchorcoder, span"
        )
    t = cfg["trainer"]
    if method.name == "span" and t.get("objective", "ce") != "ce":
        raise ConfigError(
            "method=span trains with trainer.objective=ce only (a dense teacher's logits on the sentinel stream "
            "are not the rewritten labels' targets)"
        )
    if t.get("name") not in MODES:
        raise ConfigError(f"trainer must be one of {', '.join(MODES)}; got '{t.get('name')}'")
    if t.get("precision", "auto") not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}; got '{t.get('precision')}'")
    for key in ("max_steps", "batch_size", "grad_accumulation", "logging_steps", "save_steps"):
        if not isinstance(t.get(key), int) or t[key] < 1:
            raise ConfigError(f"trainer.{key} must be a positive integer; got {t.get(key)!r}")
    if t.get("attention", "sdpa") not in ATTENTION:
        raise ConfigError(f"trainer.attention must be one of {', '.join(ATTENTION)}; got '{t.get('attention')}'")
    if t.get("attention") == "flex":
        from anchorcoder.models.loading import resolve_device

        if resolve_device(cfg.get("device", "auto")).type != "cuda":
            raise ConfigError(
                "trainer.attention=flex needs a CUDA device (FlexAttention has no backward pass on CPU); "
                "use trainer.attention=sdpa"
            )
        if method.reshapes_attention:
            log.warning("method=%s reshapes attention (e.g. LAA): its training forward stays on sdpa", method.name)
    if t.get("objective", "ce") not in OBJECTIVES:
        raise ConfigError(f"trainer.objective must be one of {', '.join(OBJECTIVES)}; got '{t.get('objective')}'")
    if not 0 <= float(t.get("distill_alpha", 0.5)) <= 1:
        raise ConfigError(f"trainer.distill_alpha must be in [0, 1]; got {t.get('distill_alpha')!r}")
    if not float(t.get("distill_temperature", 1.0)) > 0:
        raise ConfigError(f"trainer.distill_temperature must be > 0; got {t.get('distill_temperature')!r}")
    if cfg["deepspeed"].get("name") not in DEEPSPEED:
        raise ConfigError(f"deepspeed must be one of {', '.join(DEEPSPEED)}; got '{cfg['deepspeed'].get('name')}'")
    if t.get("objective", "ce") != "ce" and t["name"] == "full" and cfg["deepspeed"].get("name") == "zero3":
        raise ConfigError(
            "trainer.objective=distill|mix with trainer=full needs a frozen teacher copy, which ZeRO-3's sharded "
            "model cannot give: use deepspeed=zero2 (or trainer=lora, whose teacher is its own base)"
        )
    if cfg["data"].get("source") == "self_distill":
        from anchorcoder.training.self_distill import check_config

        check_config(cfg["data"])
    if not isinstance(cfg["data"].get("seq_len"), int) or cfg["data"]["seq_len"] < 2:
        raise ConfigError(f"data.seq_len must be an integer >= 2; got {cfg['data'].get('seq_len')!r}")
    return method, build_tracker(cfg["logger"])


def check_against_model(cfg: dict, model) -> None:
    """What needs the loaded model: sequence length and LoRA target modules."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and cfg["data"]["seq_len"] > limit:
        raise ConfigError(f"data.seq_len={cfg['data']['seq_len']} is longer than the model allows ({limit} positions)")
    if cfg["trainer"]["name"] == "lora":
        targets = list(cfg["trainer"]["lora"]["target_modules"])
        linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        unknown = [t for t in targets if t not in linear]
        if unknown or not targets:
            raise ConfigError(
                f"trainer.lora.target_modules: {unknown or targets} not in the model; its linear modules: "
                f"{', '.join(sorted(linear))}"
            )


# ---------------------------------------------------------------------------- the loop
def _trainer_class():
    from transformers import Trainer

    class MethodTrainer(Trainer):
        """The HF Trainer with the method's masked forward, tokens/s and mask density in its logs."""

        def __init__(self, *args, method: KVMethod, objective: Objective, teacher=None, tokens_seen=0, **kwargs):
            super().__init__(*args, **kwargs)
            self.method, self.objective, self.teacher = method, objective, teacher
            self.tokens_seen = tokens_seen
            self._tokens, self._clock, self._density, self._parts = 0, time.perf_counter(), [], {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            if self.objective.name == "ce":
                extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
                outputs = masked_forward(
                    model, self.method, inputs["input_ids"], inputs["padding_mask"], doc_ids=inputs["doc_ids"],
                    prompt_lengths=inputs["prompt_lengths"], labels=inputs["labels"], unwrapped=unwrapped, **extra,
                )  # fmt: skip
                loss = outputs.loss
            else:
                outputs = masked_forward(
                    model, self.method, inputs["input_ids"], inputs["padding_mask"], doc_ids=inputs["doc_ids"],
                    prompt_lengths=inputs["prompt_lengths"], unwrapped=unwrapped,
                )  # fmt: skip
                teacher_logits = teacher_forward(self.teacher or unwrapped, inputs)
                loss, parts = self.objective.loss(
                    outputs.logits, teacher_logits, inputs["labels"], self.method.hidden_token_ids, num_items_in_batch
                )
                outputs.loss = loss
                if model.training:
                    for key, value in parts.items():
                        self._parts.setdefault(key, []).append(value)
            if not _finite_everywhere(loss, self.args.world_size):
                raise NonFiniteLoss(f"the loss is {loss.item()} at step {self.state.global_step + 1}")
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # the loss is over this process' tokens / all processes' tokens; DDP and DeepSpeed average
                # gradients over processes, so scale back up (as the Trainer's own compute_loss does)
                loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
            if model.training:
                self._tokens += int(inputs["padding_mask"].sum())
                if self.state.global_step % self.args.logging_steps == 0:
                    self._density.append(mask_density(self.method, inputs))
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            # keep the model routed through our attention for backward too: with gradient checkpointing
            # the recomputed layers must see the method's attention again (AnchorCoder's LAA, MHPE).
            # A FlexAttention model under an anchor method's BlockMask keeps its own attention.
            from anchorcoder.generation.attention import causal_masks, engine_attention

            unwrapped = self.accelerator.unwrap_model(model)
            flex = unwrapped.config._attn_implementation == "flex_attention"
            if flex and isinstance(self.method, AnchorMethod) and not self.method.reshapes_attention:
                return super().training_step(model, inputs, num_items_in_batch)
            with engine_attention(unwrapped), causal_masks():
                return super().training_step(model, inputs, num_items_in_batch)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:  # a training log: add throughput and the mask's density since the last one
                now = time.perf_counter()
                logs["tokens_per_s"] = round(self._tokens * self.args.world_size / max(now - self._clock, 1e-9), 1)
                self.tokens_seen += self._tokens * self.args.world_size
                logs["tokens_seen"] = self.tokens_seen  # real tokens fed in training so far (resumes included)
                if self._density:
                    logs["mask_density"] = round(sum(self._density) / len(self._density), 4)
                for key, values in self._parts.items():  # the objective's parts (distill: kl, ce)
                    logs[key] = round(sum(values) / len(values), 4)
                self._tokens, self._clock, self._density, self._parts = 0, now, [], {}
            super().log(logs, *args, **kwargs)

    return MethodTrainer


@dataclass
class Objective:
    """What the student (the method's masked forward) is trained to match, on supervised positions.

    - ``ce``: cross-entropy on the labels (the HF loss);
    - ``distill``: KL(teacher || student) over the vocabulary at temperature ``temperature`` (scaled by
      its square, as Hinton et al. do), where the teacher is the same base model under the plain causal
      mask (LoRA: adapters disabled; full: a frozen copy); positions whose target is a token the method
      inserts (AnLLM's ``<AC>``), which the teacher never predicts, take cross-entropy instead;
    - ``mix``: ``alpha * distill + (1 - alpha) * ce``.
    Sums are over supervised positions, divided by ``num_items`` (all processes' and micro-steps'
    supervised tokens, as the HF loss does) or by this batch's count."""

    name: str = "ce"
    alpha: float = 0.5
    temperature: float = 1.0

    def loss(self, student, teacher, labels, hidden_ids=frozenset(), num_items=None):
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        # only supervised rows enter the vocabulary-wide work (chat rows: the answer, not the prompt)
        student, teacher, targets = (
            student[:, :-1][supervised].float(),
            teacher[:, :-1][supervised].float(),
            targets[supervised],
        )
        inserted = torch.isin(targets, torch.tensor(sorted(hidden_ids), dtype=targets.dtype, device=targets.device))
        count = num_items if num_items is not None else supervised.sum().clamp(min=1)
        log_student = torch.log_softmax(student / self.temperature, dim=-1)
        log_teacher = torch.log_softmax(teacher / self.temperature, dim=-1)
        kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1) * self.temperature**2
        log_plain = log_student if self.temperature == 1 else torch.log_softmax(student, dim=-1)
        nll = -log_plain.gather(-1, targets[:, None]).squeeze(-1)
        kl_sum = kl[~inserted].sum()
        ce_sum = nll.sum()
        if self.name == "distill":
            total = kl_sum + nll[inserted].sum()
        else:
            total = self.alpha * (kl_sum + nll[inserted].sum()) + (1 - self.alpha) * ce_sum
        plain = max(len(targets), 1)
        return total / count, {"loss_kl": float(kl_sum.detach() / plain), "loss_ce": float(ce_sum.detach() / plain)}


def teacher_forward(model, batch: dict) -> torch.Tensor:
    """Logits of the dense teacher: the plain causal mask within documents, no gradient. A peft model
    runs with its adapters disabled (the base weights); any other model is a frozen copy."""
    from anchorcoder.methods.dense import Dense

    context = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with torch.no_grad(), context:
        return masked_forward(
            model, Dense(), batch["input_ids"], batch["padding_mask"], doc_ids=batch["doc_ids"]
        ).logits


def _frozen_teacher(model, device):
    teacher = copy.deepcopy(model).to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _agree(flag: bool, world_size: int, device) -> bool:
    """True on every process if ``flag`` is true on any (so all processes stop at the same step)."""
    if world_size <= 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _finite_everywhere(loss: torch.Tensor, world_size: int) -> bool:
    return not _agree(not bool(torch.isfinite(loss).all()), world_size, loss.device)


def mask_density(method: KVMethod, batch: dict) -> float:
    """Visible (query, key) pairs under the method's rule over those of the causal mask (same data)."""
    from anchorcoder.methods.anchors import document_mask, real_tokens

    if not isinstance(method, AnchorMethod):
        return 1.0
    real, _ = real_tokens(batch["input_ids"], batch["padding_mask"], batch["doc_ids"])
    causal = document_mask(True, real, batch["doc_ids"]) & real[:, None, :, None]  # padding rows out
    rule = method.attention_mask(batch["input_ids"], batch["padding_mask"], batch["prompt_lengths"], batch["doc_ids"])
    return float((rule & causal).sum() / causal.sum().clamp(min=1))


def _callbacks(tracker: Tracker, output_dir: Path, max_minutes: float | None):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        """Every log to ``train_log.jsonl`` and the tracker; stops (and saves) at ``max_minutes``."""

        def __init__(self):
            self.start = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            entry = {"step": state.global_step, **logs}
            with open(output_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            prefix = "eval/" if any(k.startswith("eval_") for k in logs) else "train/"
            tracker.log_metrics(
                {prefix + k.removeprefix("eval_"): v for k, v in logs.items()} | {"step": entry["step"]}
            )

        def on_step_end(self, args, state, control, **kwargs):
            late = bool(max_minutes) and time.perf_counter() - self.start > 60 * max_minutes
            if max_minutes and _agree(late, args.world_size, args.device):  # every process stops together
                log.info(
                    "trainer.max_minutes=%s reached at step %d: saving and stopping", max_minutes, state.global_step
                )
                control.should_training_stop = True
                control.should_save = True
            return control

    return [Record()]


def _training_arguments(cfg: dict, output_dir: Path, device: torch.device):
    from transformers import TrainingArguments

    t, ds = cfg["trainer"], cfg["deepspeed"]
    bf16 = t["precision"] == "bf16" or (t["precision"] == "auto" and device.type == "cuda")
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t["max_steps"],
        per_device_train_batch_size=t["batch_size"],
        per_device_eval_batch_size=t["batch_size"],
        gradient_accumulation_steps=t["grad_accumulation"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler"],
        warmup_steps=t["warmup_steps"],
        weight_decay=t["weight_decay"],
        max_grad_norm=t["max_grad_norm"],
        **_checkpointing(t["gradient_checkpointing"]),
        bf16=bf16,
        logging_steps=t["logging_steps"],
        eval_strategy="steps" if t.get("eval_steps") else "no",
        eval_steps=t.get("eval_steps") or None,
        save_strategy="steps",
        save_steps=t["save_steps"],
        save_total_limit=t.get("save_total_limit"),
        seed=int(cfg.get("seed", 0)),
        deepspeed=ds["config"] if ds["name"] != "none" else None,
        ddp_backend="gloo" if device.type == "cpu" and "RANK" in os.environ else None,  # set by launchers
        use_cpu=device.type == "cpu",
        report_to=[],  # our tracker logs (offline W&B by default)
        label_names=["labels"],
        prediction_loss_only=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def _checkpointing(enabled: bool) -> dict:
    """Activation checkpointing arguments, non-reentrant (reentrant loses LAA's gradient into its source
    layer); transformers renamed them from ``gradient_checkpointing*`` after 5.2."""
    from dataclasses import fields

    from transformers import TrainingArguments

    name = "activation_checkpointing"
    if name not in {f.name for f in fields(TrainingArguments)}:
        name = "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def _single_process_env(deepspeed: bool, device: torch.device) -> None:
    """DeepSpeed wants a process group even for one process: make one when no launcher did."""
    if not deepspeed:
        return
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _wrap_lora(model, cfg: dict, method: KVMethod):
    from peft import LoraConfig, get_peft_model

    lora = cfg["trainer"]["lora"]
    new_tokens = sorted(method.hidden_token_ids)  # tokens the method added: their rows train too
    config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM",
        trainable_token_indices=new_tokens or None,
        modules_to_save=[GATE_MODULE] if getattr(method, "laa_gate", False) and method.laa else None,
    )  # fmt: skip
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA: %s trainable parameters of %s (%.2f %%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


# ---------------------------------------------------------------------------- entry point
def run_train(cfg: DictConfig | dict, output_dir: str | Path) -> dict:
    from transformers.trainer_utils import IntervalStrategy

    from anchorcoder.distributed import adopt_submitit_tasks
    from anchorcoder.evaluation.run import discard_unfinished_run_dir, run_info
    from anchorcoder.models.loading import resolve_device

    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    output_dir = Path(output_dir)
    try:
        method, tracker = validate(container)
        resume_from = _resume_point(container, output_dir)
        locate_model(container["model"])
    except ConfigError:
        discard_unfinished_run_dir(output_dir)
        raise
    adopt_submitit_tasks()  # a multi-task SLURM job (hydra/launcher=slurm): its ranks, as torchrun gives them
    device = resolve_device(container.get("device", "auto"))
    deepspeed = container["deepspeed"]["name"] != "none"
    _single_process_env(deepspeed, device)
    args = _training_arguments(container, output_dir, device)  # before the model: ZeRO-3 builds it sharded
    torch.manual_seed(args.seed)

    model_cfg = dict(container["model"])
    if model_cfg.get("dtype", "auto") == "auto":
        model_cfg["dtype"] = "bfloat16" if args.bf16 and container["trainer"]["name"] == "lora" else "float32"
    loaded = load_model(model_cfg, "cpu")  # the Trainer places it
    model, tokenizer = loaded.model, loaded.tokenizer
    try:
        # self_distill answers with the plain model, before the method adds tokens or gates
        generator = {"model": model, "tokenizer": tokenizer, "device": device, "model_cfg": container["model"],
                     "sharded": container["deepspeed"]["name"] == "zero3"}  # fmt: skip
        train_docs, val_docs = load_documents(container["data"], generator)
        method.prepare(model, tokenizer)
        check_against_model(container, model)
        check_contamination(train_docs + val_docs, benchmark_needles(container["data"]))
    except ConfigError:
        discard_unfinished_run_dir(output_dir)
        raise
    seq_len = container["data"]["seq_len"]
    pack = bool(container["data"].get("pack", True))
    train_rows = pack_documents(train_docs, method, tokenizer, seq_len, pack)
    val_rows = pack_documents(val_docs, method, tokenizer, seq_len, pack)[
        : container["trainer"].get("eval_rows") or None
    ]
    if not train_rows:
        raise ConfigError("the training data is empty after tokenisation")
    data_info = {
        "train_documents": len(train_docs), "validation_documents": len(val_docs), "train_rows": len(train_rows),
        "train_tokens": sum(len(d) for row in train_rows for d in row), "validation_rows": len(val_rows),
    }  # fmt: skip
    log.info("data: %s", data_info)
    if not val_rows:
        log.warning("no validation documents (data.validation_fraction): no eval loss in this run")
        args.eval_strategy = IntervalStrategy.NO

    model.train()
    model.config.use_cache = False
    if container["trainer"].get("attention") == "flex":  # masked_forward then hands the method's BlockMask to it
        model.set_attn_implementation("flex_attention")
    t = container["trainer"]
    objective = Objective(
        t.get("objective", "ce"), float(t.get("distill_alpha", 0.5)), float(t.get("distill_temperature", 1.0))
    )
    teacher = None
    if objective.name != "ce" and t["name"] == "full":  # LoRA's teacher is its own base (adapters disabled)
        teacher = _frozen_teacher(model, args.device)
    if container["trainer"]["name"] == "lora":
        model = _wrap_lora(model, container, method)
    if container["trainer"]["gradient_checkpointing"] and container["trainer"]["name"] == "lora":
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path

    output_dir.mkdir(parents=True, exist_ok=True)
    main_process = args.process_index == 0
    if main_process:
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(container))
        info = run_info(container, loaded.info) | {"data": data_info, "resumed_from": resume_from}
        (output_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
        tracker.start(container, container.get("run_name", "train"), str(output_dir), job_type="train")
    try:
        trainer = _trainer_class()(
            model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows or None,
            data_collator=PackedCollator(tokenizer.pad_token_id, method.training_labels), processing_class=tokenizer,
            callbacks=_callbacks(tracker, output_dir, container["trainer"].get("max_minutes")), method=method,
            objective=objective, teacher=teacher, tokens_seen=_logged_tokens(output_dir) if resume_from else 0,
        )  # fmt: skip
        metrics = _train_and_save(trainer, container, output_dir, resume_from, data_info, main_process)
    except NonFiniteLoss as err:
        tracker.finish(failed=True)
        raise NonFiniteLoss(
            f"{err}: training stopped, nothing was saved after the last good checkpoint "
            f"({_last_checkpoint(output_dir) or 'none yet'}). Lower trainer.learning_rate and resume with "
            "trainer.resume=true."
        ) from None
    except KeyboardInterrupt:
        tracker.finish(failed=True)
        print(
            f"\ninterrupted: checkpoints are in {output_dir} (last: {_last_checkpoint(output_dir) or 'none yet'}); "
            f"re-run with the same overrides, trainer.resume=true and hydra.run.dir={output_dir} to continue",
            file=sys.stderr,
        )
        raise
    except BaseException:
        tracker.finish(failed=True)
        raise
    if main_process:
        tracker.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, int | float)})
        tracker.log_artifact(str(output_dir / FINAL), name=f"{container.get('run_name', 'train')}-final", kind="model")
        tracker.finish()
        _print_summary(metrics, output_dir / FINAL)
    return metrics


def _train_and_save(trainer, cfg: dict, output_dir: Path, resume_from, data_info: dict, main_process: bool) -> dict:
    """Train, evaluate, write ``final/`` and then ``metrics.json`` (the mark of a finished run)."""
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {
        "status": "finished", "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "train_seconds": round(time.perf_counter() - started, 1), "engine": type(trainer.model_wrapped).__name__,
        **data_info,
    }  # fmt: skip
    if trainer.eval_dataset:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        if cfg["trainer"].get("objective", "ce") == "ce":  # a distillation loss is no perplexity
            metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50))
    final = output_dir / FINAL
    trainer.save_model(str(final))  # adapter (LoRA) or weights (full); the tokenizer with its new tokens
    if main_process:
        (final / METHOD_FILE).write_text(OmegaConf.to_yaml(cfg["method"]))
        if cfg["trainer"]["name"] == "lora" and cfg["trainer"].get("save_merged"):
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(final / "merged")
            trainer.processing_class.save_pretrained(final / "merged")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _resume_point(cfg: dict, output_dir: Path) -> str | None:
    last = _last_checkpoint(output_dir)
    if not cfg["trainer"].get("resume"):
        if last is not None or (output_dir / "metrics.json").exists():
            raise ConfigError(
                f"{output_dir} already holds a training run; continue it with trainer.resume=true, or pick "
                "another hydra.run.dir"
            )
        return None
    if last is None:
        raise ConfigError(
            f"trainer.resume=true but {output_dir} has no checkpoint-*; point hydra.run.dir at the run folder "
            "to continue (outputs/train/<run>)"
        )
    saved = output_dir / "config.yaml"
    if saved.exists():
        before = OmegaConf.to_container(OmegaConf.load(saved))
        for key in ("model", "method", "data"):
            if before.get(key) != cfg.get(key):
                raise ConfigError(
                    f"trainer.resume=true: '{key}' differs from the run's config.yaml; resume with the same {key}"
                )
    step = int(last.name.split("-")[1])
    log_file = output_dir / "train_log.jsonl"
    if log_file.exists() and int(os.environ.get("RANK", 0)) == 0:  # forget the steps that run again
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= step]
        log_file.write_text("".join(line + "\n" for line in kept))
    log.info("resuming from %s", last)
    return str(last)


def _logged_tokens(output_dir: Path) -> int:
    """Tokens seen up to the checkpoint a run resumes from (its log is cut there)."""
    log_file = output_dir / "train_log.jsonl"
    entries = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
    return max((e["tokens_seen"] for e in entries if "tokens_seen" in e), default=0)


def _last_checkpoint(output_dir: Path) -> Path | None:
    steps = [(int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def _print_summary(metrics: dict, final: Path) -> None:
    from anchorcoder.reporting import print_table

    print_table("training", metrics)
    print(f"saved: {final}  (evaluate: python eval.py method=<method> model.adapter={final.parent})")
