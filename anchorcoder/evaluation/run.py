"""``eval.py``'s job: model + method + benchmark -> generations, verdicts, quality/KV/speed metrics, files.

Run folder (Hydra's output dir) after a run:

- ``config.yaml``        the resolved config
- ``run_info.json``      library versions, model revision, device, seed, git commit, benchmark, sandbox
- ``generations.jsonl``  one line per sample, appended as each finishes (the resume log)
- ``engine_stats.json``  the engine's timings, summed over every invocation that added samples
  (data-parallel: rank K > 0 keeps its own ``engine_stats.rank<K>.json``)
- ``results.jsonl``      one line per sample: completion, passed + reason (or nll), KV figures
- ``metrics.json``       written last: its presence marks a finished run

Re-running into the same folder (``hydra.run.dir=<folder>``) skips the samples already in
``generations.jsonl``; the config must match, except for keys that do not change a sample.

Data-parallel (``torchrun --nproc_per_node N eval.py ...``, see :mod:`anchorcoder.distributed`): the
samples still to generate are dealt round-robin to the ranks; rank K appends to
``generations.rank<K>.jsonl``. Rank 0 merges every log into ``generations.jsonl`` (at the start, which
is how a run resumes at any world size, and at the end), scores, writes the files and logs once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from anchorcoder import distributed
from anchorcoder.benchmarks import Benchmark, ExecutionSettings, build_benchmark
from anchorcoder.benchmarks.base import ExecutionBenchmark, encode_prompt
from anchorcoder.evaluation.scoring import check_pass_k, pass_at_k
from anchorcoder.generation.engine import GenerationEngine, GenerationSettings, RunStats, check_batching
from anchorcoder.methods import KVMethod, build_method
from anchorcoder.models import check_model_config, load_model, locate_model
from anchorcoder.registry import ConfigError, load_all
from anchorcoder.reporting import kv_and_speed_metrics, print_table
from anchorcoder.tracking import NoTracker, Tracker, build_tracker

log = logging.getLogger(__name__)

# Keys that may differ when resuming into a run folder: they do not change any sample.
RESUME_IGNORES = (
    "logger",
    "paths",
    "task_name",
    "run_name",
    "device",
    "execution",
    "generation.batch_size",
    "generation.continuous_batching",
    "generation.pass_k",
    "benchmark.limit",
    "benchmark.timeout_s",  # changes verdicts only: a resumed run scores every sample again
)


@dataclass
class EvalParts:
    method: KVMethod
    benchmark: Benchmark
    tracker: Tracker
    settings: GenerationSettings
    pass_k: list[int]
    execution: ExecutionSettings


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
    generation = dict(cfg["generation"])
    pass_k = generation.pop("pass_k", [1])
    known = {f.name for f in fields(GenerationSettings)} - {"stop", "seed"}
    unknown = sorted(set(generation) - known)
    if unknown:
        raise ConfigError(
            f"unknown generation option(s) {', '.join('generation.' + k for k in unknown)}; "
            f"valid: {', '.join(sorted(known | {'pass_k'}))}"
        )
    settings = GenerationSettings(**generation, seed=int(cfg.get("seed", 0)))
    pass_k = check_pass_k(list(pass_k), settings.n_samples)
    check_batching(method, settings)
    execution = cfg.get("execution") or {}
    known = {f.name for f in fields(ExecutionSettings)}
    if set(execution) - known:
        raise ConfigError(
            f"unknown execution option(s) {sorted(set(execution) - known)}; valid: {', '.join(sorted(known))}"
        )
    return EvalParts(method, benchmark, tracker, settings, pass_k, ExecutionSettings(**execution))


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


def _flatten(cfg: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(out: Path, config: dict) -> None:
    """Refuse a folder holding samples of a config that differs in anything that changes a sample."""
    saved_config = out / "config.yaml"
    if not saved_config.exists() or not any(out.glob("generations*.jsonl")):
        return
    before = _flatten(OmegaConf.to_container(OmegaConf.load(saved_config), resolve=False))
    now = _flatten(config)
    ignored = lambda k: any(k == i or k.startswith(i + ".") for i in RESUME_IGNORES)  # noqa: E731
    differ = sorted(k for k in set(before) | set(now) if not ignored(k) and before.get(k) != now.get(k))
    if differ:
        raise ConfigError(
            f"{out} holds samples of a different config (differs at {', '.join(differ[:5])}); "
            "resume with the same config, or pick a new run folder"
        )


def generation_log(out: Path, ranks: distributed.Ranks) -> Path:
    return out / (f"generations.rank{ranks.rank}.jsonl" if ranks.parallel else "generations.jsonl")


def stats_file(out: Path, rank: int) -> Path:
    return out / ("engine_stats.json" if rank == 0 else f"engine_stats.rank{rank}.json")


def merge_generation_logs(out: Path) -> dict[tuple[str, int], dict]:
    """Every sample in ``out``'s logs, by (task_id, sample index), now all in ``generations.jsonl``.

    Reads ``generations.jsonl`` and the ranks' ``generations.rank<K>.jsonl``, drops lines torn by an
    interrupt, rewrites ``generations.jsonl`` with every sample and removes the rank logs.
    """
    merged = out / "generations.jsonl"
    rank_logs = sorted(out.glob("generations.rank*.jsonl"))
    records, torn = {}, False
    for log_file in [merged, *rank_logs]:
        if not log_file.exists():
            continue
        for line in log_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn = True  # by an interrupt
                continue
            records[(record["task_id"], record["sample_index"])] = record
    if rank_logs or torn:  # else generations.jsonl already holds exactly these
        tmp = out / "generations.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
        os.replace(tmp, merged)
        for log_file in rank_logs:
            log_file.unlink()
    return records


def read_samples(out: Path) -> dict[tuple[str, int], dict]:
    """The samples in ``generations.jsonl`` (after :func:`merge_generation_logs`), by (task_id, sample index)."""
    log_file = out / "generations.jsonl"
    if not log_file.exists():
        return {}
    records = (json.loads(line) for line in log_file.read_text().splitlines())
    return {(r["task_id"], r["sample_index"]): r for r in records}


def benchmark_inputs(benchmark: Benchmark, method: KVMethod, tokenizer, style: str):
    """A benchmark's problems as the engine takes them: the prompts rendered in ``style`` and encoded
    as ``method`` feeds them, the stop strings, and for perplexity benchmarks the teacher-forced targets."""
    problems = benchmark.problems(tokenizer)
    prompts = [benchmark.render_prompt(p, style, tokenizer) for p in problems]
    prompt_ids = [encode_prompt(method, tokenizer, text, style) for text in prompts]
    targets = None
    if benchmark.kind == "perplexity":
        # as the method would have generated them: AnLLM-AC's <AC> in the text; span's sentinels are fed by the engine
        targets = [method.encode_continuation(tokenizer, p.data["target"]) for p in problems]
    return problems, prompt_ids, benchmark.stop_strings(style), targets


def warn_untrained(method: KVMethod, method_cfg: dict, adapter: str | None) -> None:
    """A trained method on a model not trained under it (or under another method) keeps its cache
    figures but loses quality: say so once."""
    trained_with = _adapter_method(adapter)
    if trained_with and trained_with != method_cfg:
        log.warning("model.adapter was trained with method %s; evaluated with %s", trained_with, method_cfg)
    if method.trained and not adapter:
        log.warning(
            "method=%s is meant for a model fine-tuned under it (train.py); a model that was not "
            "keeps its cache figures but loses quality",
            method.name,
        )


def run_eval(cfg: DictConfig | dict, output_dir: str | Path, loaded=None) -> dict:
    """Evaluate; returns the metrics dict (also written to ``metrics.json``). ``loaded``: a model
    already loaded from this config's ``model`` (:func:`anchorcoder.load`), used instead of loading.
    Launched as several processes (torchrun), each generates its share and every rank returns the metrics."""
    ranks, started_group = distributed.start()
    try:
        return _run_eval(cfg, Path(output_dir), loaded, ranks)
    finally:
        distributed.stop(started_group)


def _run_eval(cfg: DictConfig | dict, out: Path, loaded, ranks: distributed.Ranks) -> dict:
    started = time.perf_counter()
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    own_dir, out = out, Path(distributed.from_main(ranks, str(out)))  # Hydra's timestamp may differ per rank
    if own_dir != out:
        discard_unfinished_run_dir(own_dir)
    try:
        parts = validate(container)
        if ranks.parallel and container["model"].get("device_map"):
            raise ConfigError(
                "model.device_map spreads one model over the GPUs, while a data-parallel run (torchrun) gives each "
                "process its own replica: use one or the other"
            )
        check_resumable(out, container)
        parts.benchmark.preload()  # a bad data file is refused before the model loads
        if loaded is None:
            locate_model(container["model"])
    except ConfigError:
        if ranks.main:
            discard_unfinished_run_dir(out)
        raise
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
        (out / "metrics.json").unlink(missing_ok=True)
        merge_generation_logs(out)  # an interrupted run's rank logs, whatever its world size
    else:
        parts.tracker = NoTracker()  # rank 0 logs for all
    distributed.barrier(ranks)
    previous = read_samples(out)
    torch.manual_seed(parts.settings.seed)

    model_cfg, method, benchmark = container["model"], parts.method, parts.benchmark
    run_name = f"{model_cfg['name']}/{method.name}/{benchmark.name}"
    parts.tracker.start(container, run_name=run_name, output_dir=str(out), job_type="eval")
    failed = True
    try:
        if loaded is None:
            loaded = load_model(model_cfg, ranks.device(container.get("device", "auto")))
        model, tokenizer = loaded.model, loaded.tokenizer
        info = run_info(container, loaded.info)
        info["processes"] = ranks.world_size
        style = benchmark.prompt_style or model_cfg["prompt_style"]
        info["benchmark"] = {**benchmark.describe(), "prompt_style": style}
        if ranks.main:
            write_json(out / "run_info.json", info)
        method.prepare(model, tokenizer)
        warn_untrained(method, container["method"], model_cfg.get("adapter"))
        problems, prompt_ids, parts.settings.stop, targets = benchmark_inputs(benchmark, method, tokenizer, style)
        engine = GenerationEngine(model, tokenizer, method, parts.settings)
        own_stats = stats_file(out, ranks.rank)
        if previous and own_stats.exists():  # timings of the samples this rank generated before an interrupt
            engine.stats = RunStats(**json.loads(own_stats.read_text()))

        wanted, resumed = _generate_with_progress(
            engine, problems, prompt_ids, targets, benchmark, style, out, previous, ranks, own_stats
        )
        distributed.barrier(ranks)  # every rank's samples are in its log
        if not ranks.main:
            failed = False
            return distributed.from_main(ranks, None)
        everything = merge_generation_logs(out)
        records = [everything[key] for key in wanted]
        if benchmark.kind == "perplexity":
            sources = {p.task_id: p.data["source"] for p in problems}
            results = [_perplexity_result(r, sources[r["task_id"]], method.hidden_token_ids) for r in records]
            metrics = perplexity_metrics(results)
        else:
            results = _check_with_progress(
                benchmark, problems, records, style, parts.execution, method.hidden_token_ids
            )
            if isinstance(benchmark, ExecutionBenchmark):  # record which sandbox layers held
                from anchorcoder.execution import sandbox_layers

                layers = sandbox_layers(parts.execution.limits(benchmark.timeout_s))
                write_json(out / "run_info.json", {**info, "sandbox": layers})
            metrics = pass_at_k(results, parts.pass_k)
        with (out / "results.jsonl.tmp").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        os.replace(out / "results.jsonl.tmp", out / "results.jsonl")

        lanes = [RunStats(**json.loads(f.read_text())) for f in sorted(out.glob("engine_stats*.json"))]
        metrics.update(kv_and_speed_metrics(records, lanes, method.hidden_token_ids))
        metrics["run/resumed_samples"] = resumed
        metrics["run/wall_s"] = time.perf_counter() - started  # model load included
        write_json(out / "metrics.json", metrics)
        processes = f", {ranks.world_size} processes" if ranks.parallel else ""
        caption = f"{len(problems)} problems x {parts.settings.n_samples} samples, {style} prompts{processes}; {out}"
        print_table(run_name, metrics, caption=caption)
        parts.tracker.log_metrics(metrics)
        columns = list(results[0]) if results else []
        parts.tracker.log_table(
            "samples", columns, [[json.dumps(v) if isinstance(v, dict) else v for v in r.values()] for r in results]
        )
        failed = False
        return distributed.from_main(ranks, metrics)
    except KeyboardInterrupt:
        if ranks.main:
            print(
                f"\ninterrupted: finished samples are saved in {out}/generations*.jsonl; "
                f"re-run with the same overrides and hydra.run.dir={out} to continue (with any number of processes)",
                file=sys.stderr,
            )
        raise
    finally:
        parts.tracker.finish(failed=failed)


def _adapter_method(adapter: str | None) -> dict | None:
    """The method config a ``model.adapter`` run was trained with (its ``method.yaml``), if known."""
    from anchorcoder.models.loading import adapter_folder

    saved = adapter_folder(adapter) / "method.yaml" if adapter else None
    return OmegaConf.to_container(OmegaConf.load(saved)) if saved is not None and saved.exists() else None


def _perplexity_result(record: dict, source: str, hidden: frozenset[int]) -> dict:
    n = sum(1 for t in record["token_ids"] if t not in hidden)  # scored tokens: inserted anchors are not
    return {
        "task_id": record["task_id"],
        "source": source,
        "target_tokens": n,
        "nll": record["nll"],
        "ppl": math.exp(record["nll"] / n),
        "kv": record["kv"],
    }


def perplexity_metrics(results: list[dict]) -> dict:
    """Token-level perplexity over all targets, and per source."""
    metrics = {}
    groups = {"": results}
    for r in results:
        groups.setdefault(r["source"], []).append(r)
    for source, rows in groups.items():
        tokens = sum(r["target_tokens"] for r in rows)
        nll = sum(r["nll"] for r in rows)
        suffix = f"/{source}" if source else ""
        metrics[f"quality/ppl{suffix}"] = math.exp(nll / tokens)
        if not source:
            metrics["quality/nll_per_token"] = nll / tokens
            metrics["quality/target_tokens"] = tokens
    return metrics


def _check_with_progress(
    benchmark: Benchmark, problems, records, style, execution, hidden: frozenset[int] = frozenset()
) -> list[dict]:
    from tqdm.auto import tqdm

    by_id = {p.task_id: p for p in problems}
    checked = [by_id[r["task_id"]] for r in records]
    with tqdm(total=len(records), desc="checking", unit="sample", mininterval=1.0) as bar:
        verdicts = benchmark.check(
            checked, [r["completion"] for r in records], style, execution, on_result=lambda i, v: bar.update(1)
        )
    return [
        {
            "task_id": r["task_id"],
            "sample_index": r["sample_index"],
            "passed": v.passed,
            "reason": v.reason,
            "exec_s": round(v.duration_s, 4),
            "completion": r["completion"],
            "finish_reason": r["finish_reason"],
            "new_tokens": sum(t not in hidden for t in r["token_ids"]),  # the method's inserted tokens not counted
            "kv": r["kv"],
        }
        for r, v in zip(records, verdicts, strict=True)
    ]


def _generate_with_progress(
    engine, problems, prompt_ids, targets, benchmark, style, out: Path, previous, ranks, stats_path: Path
):
    """Generate (or teacher-force) this rank's share of the samples not in ``previous``, appending each
    to the rank's log. Returns every wanted (task_id, sample index), in order, and how many were resumed."""
    from tqdm.auto import tqdm

    n = engine.settings.n_samples
    wanted = [(p, s) for p in range(len(problems)) for s in range(n)]
    todo = [(p, s) for p, s in wanted if (problems[p].task_id, s) not in previous]
    mine = todo[ranks.rank :: ranks.world_size]  # round-robin: long and short prompts spread evenly
    desc = "teacher forcing" if targets is not None else "generating"
    if ranks.parallel:
        desc += f" (rank {ranks.rank} of {ranks.world_size})"
    resumed = len(wanted) - len(todo)
    shown = 0 if ranks.parallel else resumed  # one process: the bar counts every sample
    with (
        generation_log(out, ranks).open("a") as sink,
        tqdm(
            total=len(mine) + shown, initial=shown, desc=desc, unit="sample", mininterval=1.0, disable=not ranks.main
        ) as bar,
    ):

        def on_result(result):
            problem = problems[result.prompt_index]
            record = {
                "task_id": problem.task_id,
                "completion": benchmark.postprocess(problem, result.text, style),
                **result.to_dict(),
            }
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            write_json(stats_path, asdict(engine.stats))
            stats = engine.stats
            bar.set_postfix(tok_s=f"{stats.decode_tokens / stats.decode_s:.1f}" if stats.decode_s else "-")
            bar.update(1)

        if mine:
            engine.generate(prompt_ids, on_result=on_result, rows=mine, targets=targets)
            write_json(stats_path, asdict(engine.stats))  # with the last step's time
    return [(problems[p].task_id, s) for p, s in wanted], resumed
