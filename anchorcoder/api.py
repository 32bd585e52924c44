"""The engine from Python (a notebook, a script), with ``eval.py``'s defaults.

    from anchorcoder import compose, load, generate, evaluate

    model = load()                                    # SmolLM2 (embedded); load("model=qwen2.5-coder-1.5b")
    [out] = generate(model, ["Write a Python function that reverses a string."],
                     "method=l2norm", "method.compression_ratio=0.5", "generation.max_new_tokens=64")
    out.text, out.kv                                  # the answer, and the KV bytes held (final, peak, dense)
    metrics = evaluate("method=l2norm", "benchmark=humaneval", "benchmark.limit=5", model=model)

Every function takes ``eval.py``'s overrides as strings, composed from the same config files, so a
notebook and the command line run the same thing. ``generate`` renders prompts as the model expects
them (its chat template for chat models) and encodes them as the method feeds them; ``evaluate`` is
an ``eval.py`` run (its run folder, files and metrics) on a model you already loaded.

``prepare`` changes the loaded model: a method that adds tokens (AnLLM's ``<AC>``, span's
``<CL>``/``<CR>``, ``<ANC>``) adds them to the model and tokenizer, once. Another method on the same
model never feeds them (nothing it encodes contains them), but their new output rows can still be
sampled, so a run after such a method may differ from an ``eval.py`` run on a fresh load. For results
you report, load once per method that adds tokens; methods that add none (dense, l2norm, streamingllm,
anchorcoder with newline anchors, kvpress) share one model freely.
"""

from __future__ import annotations

import time
from pathlib import Path

from anchorcoder.benchmarks.base import chat_prompt, encode_prompt
from anchorcoder.generation.engine import GenerationEngine, SampleResult
from anchorcoder.methods import KVMethod, build_method
from anchorcoder.models import LoadedModel, load_model
from anchorcoder.registry import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose(*overrides: str, task: str = "eval", check: bool = True) -> dict:
    """The config ``eval.py`` (or ``train.py``: ``task="train"``) would run with these overrides,
    resolved to plain containers; an eval config is validated unless ``check=False`` (a bad key or
    value raises ConfigError)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    if not CONFIGS.is_dir():
        raise ConfigError(
            f"the config files are not at {CONFIGS}: use anchorcoder from its checkout (pip install -e .)"
        )
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_container(hydra_compose(config_name=task, overrides=list(overrides)), resolve=True)
    if task == "eval" and check:
        from anchorcoder.evaluation import validate

        validate(cfg)
    return cfg


def load(*overrides: str, device: str | None = None) -> LoadedModel:
    """The model (and adapter) of ``model=...`` overrides, on ``device`` (default: the config's)."""
    cfg = compose(*overrides)
    return load_model(cfg["model"], device or cfg.get("device", "auto"))


def prepare(model: LoadedModel, method: dict | KVMethod) -> KVMethod:
    """A method (config dict or built) made ready for ``model``: it may add its tokens (see above)."""
    method = build_method(method) if isinstance(method, dict) else method
    method.prepare(model.model, model.tokenizer)
    return method


def encode(model: LoadedModel, method: KVMethod, texts: list[str], style: str | None = None) -> list[list[int]]:
    """Token ids of prompts as ``eval.py`` feeds them: for ``chat`` (the model's default style when it
    is a chat model) each text is one user message under the chat template; ``completion`` takes the
    text as is, with the tokenizer's special tokens (BOS). The method inserts its own tokens."""
    style = style or model.config.get("prompt_style", "completion")
    if style not in ("chat", "completion"):
        raise ConfigError(f"style must be chat or completion; got '{style}'")
    if style == "chat":
        texts = [chat_prompt(model.tokenizer, t) for t in texts]
    return [encode_prompt(method, model.tokenizer, t, style) for t in texts]


def generate(
    model: LoadedModel, prompts: list[str], *overrides: str, style: str | None = None, stop: tuple[str, ...] = ()
) -> list[SampleResult]:
    """Generate for ``prompts`` under the method and ``generation.*`` settings of ``overrides``.

    Returns one :class:`SampleResult` per prompt and sample (``text``, ``token_ids``, ``finish_reason``,
    ``kv``: the bytes held at the end and at the peak, and dense's). ``stop``: strings that end a row.
    """
    from anchorcoder.evaluation.run import validate, warn_untrained

    cfg = compose(*overrides, check=False)
    parts = validate(cfg)
    method = prepare(model, parts.method)
    warn_untrained(method, cfg["method"], model.config.get("adapter"))
    parts.settings.stop = tuple(stop)
    engine = GenerationEngine(model.model, model.tokenizer, method, parts.settings)
    return engine.generate(encode(model, method, list(prompts), style))


def evaluate(*overrides: str, model: LoadedModel | None = None, output_dir: str | Path | None = None) -> dict:
    """An ``eval.py`` run: its metrics (quality, measured KV reduction, speed), and its run folder
    (default ``outputs/eval/<time>_<run name>``). With ``model``, that loaded model is used and its
    config replaces ``model.*``; otherwise ``model=...`` overrides pick one and it is loaded."""
    from anchorcoder.evaluation import run_eval

    cfg = compose(*overrides)
    if model is not None:
        named = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] == "model"]
        if named:
            raise ConfigError(f"evaluate(model=...) uses that loaded model; drop {', '.join(named)} or load it instead")
        cfg["model"] = dict(model.config)
        cfg["run_name"] = f"{model.config['name']}_{cfg['method']['name']}_{cfg['benchmark']['name']}"
    if output_dir is None:
        output_dir = Path("outputs") / "eval" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{cfg['run_name']}"
    return run_eval(cfg, output_dir, loaded=model)
