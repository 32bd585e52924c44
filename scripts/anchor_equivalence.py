"""The invariant of an anchor method, measured: max |logits| difference between one masked forward (the
training face) and incremental decoding with the cache really pruned (the inference face).

For each model, variant, sink setting and dtype, over ``--seeds`` random sequences (2 rows of
``--length`` tokens, anchors at ~8 % of positions, rows pruning at different steps), fed as a prefill
of ``--prefill`` tokens then one token at a time, and as chunks into a pruned cache. Next to it, the
float32 floor of the model itself: transformers' own ``DynamicCache`` decoding against its own full
forward, dense, on the same tokens; and how far the float32 masked forward is from float64.

    python scripts/anchor_equivalence.py                  # tiny GQA Llama and SmolLM2
    python scripts/anchor_equivalence.py --models tiny-llama --seeds 1

Writes ``outputs/bench/anchor_equivalence_<time>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from anchorcoder.generation.engine import incremental_logits
from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import masked_forward
from anchorcoder.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def random_ids(anchor: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 1000, (2, length), generator=generator)
    where = torch.rand(ids.shape, generator=generator) < 0.08
    where[:, 0] = False
    ids[where] = anchor
    return ids


def hf_floor(model, ids: torch.Tensor, prefill: int) -> float:
    """Dense: transformers' DynamicCache decoding vs its own full forward."""
    from transformers import DynamicCache

    with torch.inference_mode():
        full = model(input_ids=ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return (torch.cat(steps, dim=1) - full).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    schedules = {
        "prefill + decode": [args.prefill] + [1] * (args.length - args.prefill),
        "chunks": [args.prefill, 5, 7] + [1] * (args.length - args.prefill - 12),
    }
    rows = []
    for model_name in args.models:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = OmegaConf.to_container(compose(config_name="eval", overrides=[f"model={model_name}"]), resolve=True)
        loaded = load_model(cfg["model"], device="cpu")
        for variant in ("ep", "ac"):
            model, tokenizer = copy.deepcopy(loaded.model), copy.deepcopy(loaded.tokenizer)
            prepared = build_method({"name": "anllm", "variant": variant})
            prepared.prepare(model, tokenizer)
            model64 = copy.deepcopy(model).double()
            for sink in (0, 1):
                method = build_method({"name": "anllm", "variant": variant, "sink_tokens": sink})
                method._anchor_ids = prepared._anchor_ids
                for dtype, net in (("float32", model), ("float64", model64)):
                    worst = {name: 0.0 for name in schedules}
                    off64 = 0.0
                    for seed in range(args.seeds):
                        ids = random_ids(prepared.anchor_ids[0], args.length, seed)
                        with torch.inference_mode():
                            reference = masked_forward(net, method, ids).logits
                            if dtype == "float32":
                                exact = masked_forward(model64, method, ids).logits
                                off64 = max(off64, (reference.double() - exact).abs().max().item())
                        for name, chunks in schedules.items():
                            ours = incremental_logits(net, method, ids, chunks)
                            worst[name] = max(worst[name], (ours - reference).abs().max().item())
                    row = {"model": model_name, "variant": variant, "sink_tokens": sink, "dtype": dtype, **worst}
                    row["masked fp32 vs fp64"] = off64 if dtype == "float32" else None
                    rows.append(row)
                    print(row, flush=True)
        floor = max(hf_floor(loaded.model, random_ids(30, args.length, s), args.prefill) for s in range(args.seeds))
        rows.append({"model": model_name, "hf dense DynamicCache vs full forward (fp32)": floor})
        print(rows[-1], flush=True)

    out = ROOT / "outputs" / "bench" / f"anchor_equivalence_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(
        "\n| model | variant | sink | dtype | prefill + decode | chunks | masked fp32 vs fp64 |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        if "variant" in r:
            off = "" if r["masked fp32 vs fp64"] is None else f"{r['masked fp32 vs fp64']:.1e}"
            print(
                f"| {r['model']} | {r['variant']} | {r['sink_tokens']} | {r['dtype']} | "
                f"{r['prefill + decode']:.1e} | {r['chunks']:.1e} | {off} |"
            )
        else:
            print(
                f"| {r['model']} | dense, transformers' DynamicCache vs its full forward | | float32 | "
                f"{r['hf dense DynamicCache vs full forward (fp32)']:.1e} | | |"
            )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
