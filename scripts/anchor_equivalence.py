"""The invariant of an anchor method, measured: max |logits| difference between one masked forward (the
training face) and incremental decoding with the cache really pruned (the inference face).

For each model, method variant and dtype, over ``--seeds`` random sequences (2 rows of ``--length``
tokens, anchors at ~8 % of positions, rows pruning at different steps), fed as a prefill of
``--prefill`` tokens then one token at a time, and as chunks into a pruned cache. Next to it, the
float32 floor of the model itself, dense, on the same tokens: transformers' own ``DynamicCache``
decoding against its own full forward, and our engine's (``method=dense``) against the same full
forward; and how far the float32 masked forward is from float64.

    python scripts/anchor_equivalence.py                          # AnLLM EP/AC, tiny GQA Llama and SmolLM2
    python scripts/anchor_equivalence.py --method anchorcoder     # TAA, TAA+LAA, TAA+LAA+MHPE
    python scripts/anchor_equivalence.py --models tiny-llama --seeds 1
    python scripts/anchor_equivalence.py --method anchorcoder --variants "gated LAA (gates opened at random)"

Writes ``outputs/bench/anchor_equivalence_<time>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import types
from pathlib import Path

import torch

from anchorcoder.api import load
from anchorcoder.generation.engine import incremental_logits
from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import masked_forward

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # label -> method config
    "anllm": {
        f"{v}, sink {k}": {"name": "anllm", "variant": v, "sink_tokens": k} for v in ("ep", "ac") for k in (0, 1)
    },
    "anchorcoder": {
        "TAA": {"name": "anchorcoder", "laa": False},
        "TAA+LAA": {"name": "anchorcoder"},
        "TAA+LAA+MHPE": {"name": "anchorcoder", "mhpe": True},
        "TAA+LAA, anchor queries read LAA": {"name": "anchorcoder", "laa_anchor_queries": True},
        "gated LAA (gates opened at random)": {"name": "anchorcoder", "laa_gate": True},
    },
}


def open_gates(model, seed: int = 0) -> None:
    """Gated LAA computes exactly TAA while its gates are closed: open them so the check means something."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "laa_gate"):
            module.laa_gate.weight.data = torch.randn(module.laa_gate.weight.shape, generator=generator)


def random_ids(anchor: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 1000, (2, length), generator=generator)
    where = torch.rand(ids.shape, generator=generator) < 0.08
    where[:, 0] = False
    ids[where] = anchor
    return ids


def float64_norms(model) -> None:
    """Make RMSNorm layers compute in the model's dtype: transformers' Llama/Qwen2 RMSNorm casts to
    float32 inside, so a float64 model still rounds there (and a 1e-14 difference can flip a float32
    rounding). Same formula: ``weight * x / sqrt(mean(x^2) + eps)``."""

    def forward(self, hidden):
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)


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
    parser.add_argument("--method", choices=list(VARIANTS), default="anllm")
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", help="labels of the variants to run (default: all of --method's)")
    args = parser.parse_args()
    schedules = {
        "prefill + decode": [args.prefill] + [1] * (args.length - args.prefill),
        "chunks": [args.prefill, 5, 7] + [1] * (args.length - args.prefill - 12),
    }
    rows = []
    for model_name in args.models:
        loaded = load(f"model={model_name}", device="cpu")
        for label, options in VARIANTS[args.method].items():
            if args.variants and label not in args.variants:
                continue
            model, tokenizer = copy.deepcopy(loaded.model), copy.deepcopy(loaded.tokenizer)
            method = build_method(options)
            method.prepare(model, tokenizer)
            open_gates(model)
            model64 = copy.deepcopy(model).double()
            float64_norms(model64)
            for dtype, net in (("float32", model), ("float64", model64)):
                worst = {name: 0.0 for name in schedules}
                off64 = 0.0
                for seed in range(args.seeds):
                    ids = random_ids(method.anchor_ids[0], args.length, seed)
                    with torch.inference_mode():
                        reference = masked_forward(net, method, ids).logits
                        if dtype == "float32":
                            exact = masked_forward(model64, method, ids).logits
                            off64 = max(off64, (reference.double() - exact).abs().max().item())
                    for name, chunks in schedules.items():
                        ours = incremental_logits(net, method, ids, chunks)
                        worst[name] = max(worst[name], (ours - reference).abs().max().item())
                row = {"model": model_name, "variant": label, "dtype": dtype, **worst}
                row["masked fp32 vs fp64"] = off64 if dtype == "float32" else None
                rows.append(row)
                print(row, flush=True)
        dense = build_method({"name": "dense"})
        floor = {"transformers": 0.0, "ours": 0.0}
        for seed in range(args.seeds):
            ids = random_ids(30, args.length, seed)
            floor["transformers"] = max(floor["transformers"], hf_floor(loaded.model, ids, args.prefill))
            with torch.inference_mode():
                full = loaded.model(input_ids=ids).logits
            ours = incremental_logits(loaded.model, dense, ids, schedules["prefill + decode"])
            floor["ours"] = max(floor["ours"], (ours - full).abs().max().item())
        rows.append({"model": model_name, "dense floor (fp32)": floor})
        print(rows[-1], flush=True)

    out = ROOT / "outputs" / "bench" / f"anchor_equivalence_{args.method}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| model | variant | dtype | prefill + decode | chunks | masked fp32 vs fp64 |\n|---|---|---|---|---|---|")
    for r in rows:
        if "variant" in r:
            off = "" if r["masked fp32 vs fp64"] is None else f"{r['masked fp32 vs fp64']:.1e}"
            print(
                f"| {r['model']} | {r['variant']} | {r['dtype']} | {r['prefill + decode']:.1e} | {r['chunks']:.1e} | {off} |"
            )
        else:
            f = r["dense floor (fp32)"]
            print(
                f"| {r['model']} | dense: transformers' DynamicCache / our engine vs the full forward | float32 | "
                f"{f['transformers']:.1e} / {f['ours']:.1e} | | |"
            )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
