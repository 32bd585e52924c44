"""The recovery recipe: distillation from the dense model (the loss by hand, the teacher's forward),
the self-distillation corpus (built, cached, resumed, guarded, chat rows with labels on the answer),
and gated LAA trained with LoRA and loaded back by eval."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import compose_config
from test_training import train

from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import IGNORE_INDEX, masked_forward
from anchorcoder.registry import ConfigError
from anchorcoder.training.data import Document, PackedCollator, pack_documents
from anchorcoder.training.trainer import Objective, _frozen_teacher, teacher_forward


def lora_model(loaded):
    """A LoRA-wrapped copy of ``loaded.model`` whose adapter changes the output (random B)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(copy.deepcopy(loaded.model), config)


def batch_of(method, tokenizer, texts, prompts=None):
    docs = [Document(str(i), t, prompt=(prompts or [""] * len(texts))[i]) for i, t in enumerate(texts)]
    return PackedCollator(tokenizer.pad_token_id)(pack_documents(docs, method, tokenizer, 64, pack=False))


CODE = ["def f(x):\n    y = x + 1\n    return y * 2\n", "for i in range(3):\n    print(i)\n"]


# ---------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("name", ["distill", "mix"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_equals_a_hand_computation(tiny, name, temperature):
    method = build_method({"name": "anchorcoder"})
    method.prepare(tiny.model, tiny.tokenizer)
    model = lora_model(tiny)
    batch = batch_of(method, tiny.tokenizer, CODE)
    with torch.no_grad():
        student = masked_forward(model, method, batch["input_ids"], batch["padding_mask"], doc_ids=batch["doc_ids"])
        teacher = teacher_forward(model, batch)
    objective = Objective(name, alpha=0.3, temperature=temperature)
    loss, parts = objective.loss(student.logits, teacher, batch["labels"])
    kl_terms, ce_terms = [], []
    for r in range(batch["labels"].shape[0]):
        for i in range(batch["labels"].shape[1] - 1):
            target = int(batch["labels"][r, i + 1])
            if target == IGNORE_INDEX:
                continue
            p = torch.softmax(teacher[r, i].double() / temperature, -1)
            q = torch.softmax(student.logits[r, i].double() / temperature, -1)
            kl_terms.append(float((p * (p.log() - q.log())).sum()) * temperature**2)
            ce_terms.append(-math.log(float(torch.softmax(student.logits[r, i].double(), -1)[target])))
    kl, ce = sum(kl_terms) / len(kl_terms), sum(ce_terms) / len(ce_terms)
    expected = kl if name == "distill" else 0.3 * kl + 0.7 * ce
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert parts["loss_kl"] == pytest.approx(kl, rel=1e-4) and parts["loss_ce"] == pytest.approx(ce, rel=1e-4)


def test_inserted_anchor_targets_take_cross_entropy_not_kl(tiny):
    """The dense teacher never predicts a token the method inserts (AnLLM's <AC>): those targets are CE."""
    labels = torch.tensor([[IGNORE_INDEX, 5, 7, 9]])
    student, teacher = torch.randn(1, 4, 12), torch.randn(1, 4, 12)
    distill, _ = Objective("distill").loss(student, teacher, labels, hidden_ids=frozenset({7}))
    log_s, log_t = torch.log_softmax(student[0], -1), torch.log_softmax(teacher[0], -1)
    kl = [(log_t[i].exp() * (log_t[i] - log_s[i])).sum() for i in (0, 2)]  # targets 5 and 9
    expected = (kl[0] + kl[1] - log_s[1, 7]) / 3
    assert distill.item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_is_the_base_model_under_the_causal_mask(tiny):
    """The teacher's logits are the untouched base model's plain forward: the adapter is off (its logits
    differ from the adapted ones) and no anchor mask applies (they differ from the masked base forward).
    The adapter is on again afterwards."""
    method = build_method({"name": "anchorcoder"})
    method.prepare(tiny.model, tiny.tokenizer)
    model = lora_model(tiny)
    batch = batch_of(method, tiny.tokenizer, CODE[:1])
    teacher = teacher_forward(model, batch)
    with torch.no_grad():
        plain = tiny.model(input_ids=batch["input_ids"]).logits
        adapted = model(input_ids=batch["input_ids"]).logits
        masked_base = masked_forward(tiny.model, method, batch["input_ids"], batch["padding_mask"]).logits
        adapted_after = model(input_ids=batch["input_ids"]).logits
    assert (teacher - plain).abs().max().item() < 1e-5
    assert (adapted - plain).abs().max().item() > 1e-2
    assert (masked_base - plain).abs().max().item() > 1e-2
    assert torch.equal(adapted, adapted_after)


def test_full_fine_tuning_teacher_is_a_frozen_copy(tiny):
    student = copy.deepcopy(tiny.model)
    teacher = _frozen_teacher(student, torch.device("cpu"))
    with torch.no_grad():
        student.lm_head.weight.mul_(2)
    batch = batch_of(build_method({"name": "dense"}), tiny.tokenizer, CODE[:1])
    with torch.no_grad():
        reference = tiny.model(input_ids=batch["input_ids"]).logits
    assert (teacher_forward(teacher, batch) - reference).abs().max().item() < 1e-5
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.objective=kd"], r"trainer.objective must be one of ce, distill, mix"),
        (["trainer.distill_alpha=1.5"], r"trainer.distill_alpha must be in \[0, 1\]"),
        (["trainer.distill_temperature=0"], r"trainer.distill_temperature must be > 0"),
        (["trainer=full", "deepspeed=zero3", "trainer.objective=distill"], r"use deepspeed=zero2"),
        (["data=self_distill", "data.prompt_sources=[humaneval]"], r"data.prompt_sources must be a non-empty list"),
        (["data=self_distill", "data.generation.top_p=0"], r"generation.top_p must be in \(0, 1\]"),
    ],
)
def test_bad_objective_and_data_options_fail_before_training(tmp_path, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        train(tmp_path / "run", "method=anchorcoder", *overrides)


def test_distill_and_mix_train_with_lora_and_full(tmp_path):
    for objective, mode in (("distill", "lora"), ("mix", "full")):
        run = tmp_path / f"{objective}-{mode}"
        metrics = train(run, "method=anchorcoder", f"trainer={mode}", f"trainer.objective={objective}")
        assert metrics["steps"] == 4 and math.isfinite(metrics["train_loss"])
        logged = [e for e in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in e]
        assert all(e["loss_kl"] >= 0 and e["loss_ce"] > 0 and e["tokens_per_s"] > 0 for e in logged)


def test_distill_resume_reproduces_the_losses_and_keeps_counting_tokens(tmp_path):
    import shutil

    options = ["method=anchorcoder", "method.laa_gate=true", "trainer.objective=distill", "trainer.lora.dropout=0.1"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    train(whole, *options)
    shutil.copytree(whole, stopped)  # the state a stop after step 2 leaves
    shutil.rmtree(stopped / "checkpoint-4")
    shutil.rmtree(stopped / "final")
    (stopped / "metrics.json").unlink()
    train(stopped, *options, "trainer.resume=true")

    def logged(run):
        return {
            e["step"]: e for e in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "loss" in e
        }

    before, after = logged(whole), logged(stopped)
    for step in (3, 4):
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-5)
        assert after[step]["tokens_seen"] == before[step]["tokens_seen"]


# ---------------------------------------------------------------------------- chat rows
def test_chat_rows_put_labels_on_the_answer_only(tiny):
    method = build_method({"name": "dense"})
    batch = batch_of(method, tiny.tokenizer, ["return 1\n", "x"], prompts=["Write it:\n", "Q?"])
    for r, (prompt, answer) in enumerate([("Write it:\n", "return 1\n"), ("Q?", "x")]):
        n_prompt = len(tiny.tokenizer(prompt, add_special_tokens=False).input_ids)
        n_answer = len(tiny.tokenizer(answer, add_special_tokens=False).input_ids) + 1  # + EOS
        assert batch["prompt_lengths"][r].item() == n_prompt
        labels = batch["labels"][r]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert (labels[n_prompt : n_prompt + n_answer] == batch["input_ids"][r, n_prompt : n_prompt + n_answer]).all()
        assert (labels[n_prompt + n_answer :] == IGNORE_INDEX).all()


# ---------------------------------------------------------------------------- the corpus
def distill_cfg(tmp_path, *overrides):
    cfg = compose_config(
        "train",
        ["data=self_distill", "data.max_prompts=8", "data.generation.max_new_tokens=96", f"data.cache_dir={tmp_path}",
         *overrides],
    )  # fmt: skip
    return cfg["data"], cfg["model"]


def test_prompts_are_mbpp_train_and_stdlib_functions_never_test_problems(smollm2, tmp_path):
    from anchorcoder.training.self_distill import distill_prompts

    data, _ = distill_cfg(tmp_path, "data.max_prompts=null")
    prompts = distill_prompts(data, smollm2.tokenizer)
    mbpp = [int(name.split("/")[1]) for name, _ in prompts if name.startswith("MBPP/")]
    stdlib = [name for name, _ in prompts if name.startswith("stdlib/")]
    assert len(mbpp) == 374 and min(mbpp) == 601 and max(mbpp) == 974 and len(stdlib) > 300
    assert all(text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n") for _, text in prompts)
    assert [n for n, _ in distill_prompts(data, smollm2.tokenizer)] == [n for n, _ in prompts]  # seeded


@pytest.mark.slow  # about 30 s; keeps the default run well under 15 min (make test-slow)
def test_corpus_is_built_once_resumed_and_guarded(smollm2, tmp_path, monkeypatch):
    from anchorcoder.generation import GenerationEngine
    from anchorcoder.training import data as data_module
    from anchorcoder.training.self_distill import self_distill_documents

    data, model_cfg = distill_cfg(tmp_path)
    fed = []
    original = GenerationEngine.generate

    def counting(self, prompts, *args, **kwargs):
        fed.append(len(prompts))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(GenerationEngine, "generate", counting)
    make = dict(model=smollm2.model, tokenizer=smollm2.tokenizer, device=torch.device("cpu"), model_cfg=model_cfg)
    docs = self_distill_documents(data, **make)
    (answers,) = tmp_path.glob("*.jsonl")
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert fed == [8] and len(rows) == 8 and 1 <= len(docs) == sum(r["kept"] for r in rows)
    for doc in docs:  # kept: a code block that parses, an answer that ended
        code = doc.text.split("```python\n", 1)[1].split("```", 1)[0]
        compile(code, doc.name, "exec")
    assert self_distill_documents(data, **make) == docs and fed == [8]  # cached: nothing generated again

    # an interrupt: two whole lines and a torn one are left, and the run is not marked done
    answers.write_text("".join(line + "\n" for line in answers.read_text().splitlines()[:2]) + '{"name": "MBP')
    next(tmp_path.glob("*.done.json")).unlink()
    assert self_distill_documents(data, **make) == docs and fed == [8, 6]

    # the guard: an answer that holds a benchmark problem is dropped
    needle = docs[0].text
    monkeypatch.setattr(data_module, "benchmark_needles", lambda cfg: {"HumanEval/0": needle})
    assert [d.name for d in self_distill_documents(data, **make)] == [d.name for d in docs[1:]]


def test_a_corpus_without_any_usable_answer_is_an_error(tiny, tmp_path):
    """The tiny random model writes no code block: the run stops with the reason."""
    from anchorcoder.training.self_distill import self_distill_documents

    data, model_cfg = distill_cfg(tmp_path, "data.max_prompts=2", "data.generation.max_new_tokens=4")
    with pytest.raises(ConfigError, match=r"none of the 2 answers holds a code block that parses"):
        self_distill_documents(data, tiny.model, tiny.tokenizer, torch.device("cpu"), model_cfg)


# ---------------------------------------------------------------------------- gated LAA
def test_gated_laa_trains_with_lora_and_eval_loads_the_gates(tmp_path):
    from anchorcoder.models import load_model

    run = tmp_path / "run"
    train(run, "method=anchorcoder", "method.laa_gate=true", "trainer.learning_rate=5e-2", "trainer.eval_steps=0")
    tuned = load_model(compose_config(overrides=["model=tiny-llama", f"model.adapter={run}"])["model"], "cpu")
    gates = {m.layer_idx: m.laa_gate.weight for m in tuned.model.modules() if hasattr(m, "laa_gate")}
    assert sorted(gates) == list(range(1, tuned.model.config.num_hidden_layers))  # layer 0 reads no source
    assert all(g.dtype == torch.float32 and g.abs().max() > 0 for g in gates.values())  # trained, loaded
