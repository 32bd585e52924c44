"""Our generation engine against transformers' ``model.generate`` on the same prompts, same run.

Greedy, EOS ignored so both produce exactly ``--new-tokens`` tokens per prompt: batch 1 (each prompt
alone) and one batch of ``--batch`` prompts (left padding), each measured ``--rounds`` times with the
two engines alternating, so drift of the machine hits both alike.
Tokens/s = generated tokens / wall time of the generate call (prefill included), for both.

    python scripts/bench_engine.py                    # SmolLM2, 8 HumanEval prompts, 64 new tokens
    python scripts/bench_engine.py model=tiny-llama   # any model config override

Writes ``outputs/bench/engine_<time>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from anchorcoder.api import load
from anchorcoder.generation.reference import engine_generate as ours
from anchorcoder.generation.reference import hf_generate, humaneval_prompts, timed
from anchorcoder.reporting import print_table

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of each measurement")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny-llama")
    args = parser.parse_args()

    loaded = load(*args.overrides)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = [tokenizer(t).input_ids for t in humaneval_prompts(args.prompts)]
    n = args.new_tokens

    with torch.inference_mode():
        ours(model, tokenizer, prompts[:1], 4)  # warm-up both paths
        hf_generate(model, tokenizer, prompts[:1], 4)

        # Batch 1: every prompt alone, `rounds` times, alternating who goes first to cancel drift.
        time_ours = time_hf = 0.0
        same_b1 = True
        for i, prompt in enumerate(prompts * args.rounds):
            order = [("ours", ours), ("hf", hf_generate)] if i % 2 == 0 else [("hf", hf_generate), ("ours", ours)]
            outputs = {}
            for name, fn in order:
                outputs[name], seconds = timed(fn, model, tokenizer, [prompt], n)
                if name == "ours":
                    time_ours += seconds
                else:
                    time_hf += seconds
            same_b1 &= outputs["ours"] == outputs["hf"]
        b1_ours, b1_hf = len(prompts) * args.rounds * n / time_ours, len(prompts) * args.rounds * n / time_hf

        # One batch of `--batch` prompts (left padding), `rounds` times, alternating.
        batch = prompts[: args.batch]
        t_ours8 = t_hf8 = 0.0
        same_b8 = True
        for i in range(args.rounds):
            first, second = (ours, hf_generate) if i % 2 == 0 else (hf_generate, ours)
            (out_a, t_a), (out_b, t_b) = (
                timed(first, model, tokenizer, batch, n),
                timed(second, model, tokenizer, batch, n),
            )
            t_ours8 += t_a if first is ours else t_b
            t_hf8 += t_b if first is ours else t_a
            same_b8 &= out_a == out_b
        b8_ours, b8_hf = args.rounds * len(batch) * n / t_ours8, args.rounds * len(batch) * n / t_hf8

    results = {
        "model": loaded.info["name"],
        "device": loaded.info["device"],
        "dtype": loaded.info["dtype"],
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "new_tokens": n,
        "rounds": args.rounds,
        "batch1/ours_tokens_per_s": b1_ours,
        "batch1/generate_tokens_per_s": b1_hf,
        "batch1/ratio": b1_ours / b1_hf,
        "batch1/identical_tokens": same_b1,
        f"batch{len(batch)}/ours_tokens_per_s": b8_ours,
        f"batch{len(batch)}/generate_tokens_per_s": b8_hf,
        f"batch{len(batch)}/ratio": b8_ours / b8_hf,
        f"batch{len(batch)}/identical_tokens": same_b8,
    }
    out_dir = ROOT / "outputs" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"engine_{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print_table("engine vs model.generate", results, caption="greedy, same prompts, same run")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
