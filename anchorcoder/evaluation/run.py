"""``eval.py``'s job: model + method + benchmark -> generations, KV/speed metrics, a table, files.

Run folder (Hydra's output dir) after a run:

- ``config.yaml``        the resolved config
- ``run_info.json``      library versions, model revision, device, seed, git commit
- ``generations.jsonl``  one line per sample, appended as each finishes
- ``metrics.json``       written last: its presence marks a finished run
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from anchorcoder.benchmarks import Benchmark, build_benchmark
from anchorcoder.generation.engine import GenerationEngine, GenerationSettings
from anchorcoder.methods import KVMethod, build_method
from anchorcoder.models import check_model_config, load_model
from anchorcoder.registry import ConfigError, load_all
from anchorcoder.reporting import kv_and_speed_metrics, print_table
from anchorcoder.tracking import Tracker, build_tracker


@dataclass
class EvalParts:
    method: KVMethod
    benchmark: Benchmark
    tracker: Tracker
    settings: GenerationSettings


def validate(cfg: dict) -> EvalParts:
    """Check every name and value of an eval config; loads nothing heavy."""
    load_all()
    for key in ("model", "method", "benchmark", "generation", "logger"):
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"config key '{key}' is missing; pick one with {key}=<name>")
    check_model_config(cfg["model"])
    method = build_method(cfg["method"])
    benchmark = build_benchmark(cfg["benchmark"])
    tracker = build_tracker(cfg["logger"])
    known = {f.name for f in fields(GenerationSettings)} - {"stop", "seed"}
    unknown = sorted(set(cfg["generation"]) - known)
    if unknown:
        raise ConfigError(
            f"unknown generation option(s) {', '.join('generation.' + k for k in unknown)}; "
            f"valid: {', '.join(sorted(known))}"
        )
    settings = GenerationSettings(**cfg["generation"], seed=int(cfg.get("seed", 0)))
    return EvalParts(method, benchmark, tracker, settings)


def discard_unfinished_run_dir(output_dir: Path) -> None:
    """Remove a run folder that holds only Hydra's own files, so a refused run leaves no trace."""
    if not output_dir.is_dir() or output_dir.resolve() == Path.cwd().resolve():
        return
    leftovers = [p for p in output_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not leftovers:
        shutil.rmtree(output_dir, ignore_errors=True)


def run_info(cfg: dict, model_info: dict) -> dict:
    import transformers

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    from anchorcoder import __version__

    return {
        "anchorcoder": __version__,
        "git_commit": commit,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "seed": cfg.get("seed"),
        "model": model_info,
    }


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_eval(cfg: DictConfig | dict, output_dir: str | Path) -> dict:
    """Evaluate; returns the metrics dict (also written to ``metrics.json``)."""
    started = time.perf_counter()
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out = Path(output_dir)
    try:
        parts = validate(container)
    except ConfigError:
        discard_unfinished_run_dir(out)
        raise
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
    torch.manual_seed(parts.settings.seed)

    model_cfg, method, benchmark = container["model"], parts.method, parts.benchmark
    run_name = f"{model_cfg['name']}/{method.name}/{benchmark.name}"
    parts.tracker.start(container, run_name=run_name, output_dir=str(out), job_type="eval")
    failed = True
    try:
        loaded = load_model(model_cfg, container.get("device", "auto"))
        model, tokenizer = loaded.model, loaded.tokenizer
        write_json(out / "run_info.json", run_info(container, loaded.info))
        method.prepare(model, tokenizer)

        style = model_cfg["prompt_style"]
        problems = benchmark.problems()
        prompts = [benchmark.render_prompt(p, style, tokenizer) for p in problems]
        prompt_ids = [tokenizer(text, add_special_tokens=(style == "completion")).input_ids for text in prompts]
        parts.settings.stop = benchmark.stop_strings(style)
        engine = GenerationEngine(model, tokenizer, method, parts.settings)

        records = _generate_with_progress(engine, problems, prompt_ids, benchmark, style, out / "generations.jsonl")
        metrics = kv_and_speed_metrics(records, engine.stats)
        metrics["run/wall_s"] = time.perf_counter() - started  # model load included
        write_json(out / "metrics.json", metrics)
        print_table(run_name, metrics, caption=f"{len(problems)} problems x {parts.settings.n_samples} samples; {out}")
        parts.tracker.log_metrics(metrics)
        parts.tracker.log_table(
            "generations",
            ["task_id", "sample", "completion", "finish", "new_tokens", "kv_bytes_final", "kv_bytes_peak"],
            [
                [
                    r["task_id"],
                    r["sample_index"],
                    r["completion"],
                    r["finish_reason"],
                    len(r["token_ids"]),
                    r["kv"]["bytes_final"],
                    r["kv"]["bytes_peak"],
                ]
                for r in records
            ],
        )
        failed = False
        return metrics
    finally:
        parts.tracker.finish(failed=failed)


def _generate_with_progress(engine, problems, prompt_ids, benchmark, style, path: Path) -> list[dict]:
    from tqdm.auto import tqdm

    records: list[dict] = []
    total = len(problems) * engine.settings.n_samples
    with path.open("a") as sink, tqdm(total=total, desc="generating", unit="sample", mininterval=1.0) as bar:

        def on_result(result):
            problem = problems[result.prompt_index]
            record = {
                "task_id": problem.task_id,
                "completion": benchmark.postprocess(problem, result.text, style),
                **result.to_dict(),
            }
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            records.append(record)
            stats = engine.stats
            bar.set_postfix(tok_s=f"{stats.decode_tokens / stats.decode_s:.1f}" if stats.decode_s else "-")
            bar.update(1)

        engine.generate(prompt_ids, on_result=on_result)
    return records
