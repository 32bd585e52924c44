"""Check an anchor method's eval run: the KV entries and bytes the engine recorded for every sample
must equal what the rule keeps for the tokens that sample fed (past anchors + the open segment), at
the end of generation and at the peak (the prompt before its first pruning, or a step before pruning).

    python scripts/check_anchor_kv.py outputs/eval/<run folder>

With ``--rule``, apply another method's rule to the run's token streams instead: the reduction that
rule would measure if it produced exactly these tokens. On a dense run, that is the most a line-anchor
method can save while writing dense's answers (its ceiling on this benchmark):

    python scripts/check_anchor_kv.py outputs/eval/<dense run> --rule method=anchorcoder method.laa=false

Reads the run's ``config.yaml`` and ``generations.jsonl``; prints the counts and the reductions
(aggregate over all tokens and per-sample mean).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from anchorcoder.api import compose, prepare
from anchorcoder.generation.engine import model_kv_shape
from anchorcoder.methods.anchors import kept_count
from anchorcoder.models import load_model
from anchorcoder.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def expected_entries(stream: list[bool], prompt_len: int, sink: int) -> tuple[int, int]:
    """(final, peak) entries per layer and KV head for a fed stream of anchor flags."""
    peak = prompt_len  # the whole prompt is held before the prefill's pruning
    for t in range(prompt_len + 1, len(stream) + 1):  # a decode step holds the pruned past + the new token
        peak = max(peak, kept_count(stream[: t - 1], sink) + 1)
    return kept_count(stream, sink), peak


def check(run_dir: Path, rule: list[str] | None = None) -> dict:
    """Recompute every sample's kept entries under the run's rule (or ``rule``, Hydra overrides).

    Returns the samples, the mismatches against the recorded KV (none checked under ``rule``) and the
    reductions: aggregate over all tokens and per-sample mean, final and at the peak.
    """
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    if rule:
        cfg["method"] = compose(*rule)["method"]
    loaded = load_model(cfg["model"], device="cpu")  # the run's own model config, as it was saved
    method = prepare(loaded, cfg["method"])
    if not getattr(method, "anchor_ids", None) or (rule and method.hidden_token_ids):
        raise ConfigError(
            f"method={cfg['method']['name']}: the check needs an anchor rule, and --rule one on the model's own "
            "tokens (anchorcoder with anchor_mode=newline); a rule that inserts tokens is checked on its own run"
        )
    anchors = set(method.anchor_ids)
    layers, kv_heads, head_dim = model_kv_shape(loaded.model)
    per_token = layers * kv_heads
    bytes_per_entry = 2 * head_dim * loaded.model.dtype.itemsize

    mismatches, per_sample = [], {"final": [], "peak": []}
    totals = {"final": 0, "peak": 0, "dense": 0}
    for line in (run_dir / "generations.jsonl").read_text().splitlines():
        record = json.loads(line)
        fed = record["prompt_token_ids"] + record["token_ids"]
        if record["finish_reason"] != "eos":
            fed = fed[:-1]  # the last sampled token is never fed (EOS is not kept in token_ids)
        prompt_len = len(record["prompt_token_ids"])
        flags = [t in anchors for t in fed]
        sink = method.sink_tokens
        if not method.compress_prompt:  # the prompt is kept whole and its anchors do not count
            flags = [False] * prompt_len + flags[prompt_len:]
            sink = max(sink, prompt_len)
        final, peak = expected_entries(flags, prompt_len, sink)
        totals["final"] += final
        totals["peak"] += peak
        totals["dense"] += len(fed)  # dense holds every fed token: its peak is its end
        per_sample["final"].append(1 - final / len(fed))
        per_sample["peak"].append(1 - peak / len(fed))
        if rule:
            continue
        kv = record["kv"]
        checks = {
            "entries_final": (kv["entries_final"], final * per_token),
            "bytes_final": (kv["bytes_final"], final * per_token * bytes_per_entry),
            "entries_peak": (kv["entries_peak"], peak * per_token),
            "bytes_peak": (kv["bytes_peak"], peak * per_token * bytes_per_entry),
            "dense_entries_final": (kv["dense_entries_final"], len(fed) * per_token),
        }
        bad = {k: v for k, v in checks.items() if v[0] != v[1]}
        if bad:
            mismatches.append((record["task_id"], bad))
    return {
        "samples": len(per_sample["final"]),
        "mismatches": mismatches,
        "reduction_final": 1 - totals["final"] / totals["dense"],
        "reduction_peak": 1 - totals["peak"] / totals["dense"],
        "reduction_final_per_sample": statistics.mean(per_sample["final"]),
        "reduction_peak_per_sample": statistics.mean(per_sample["peak"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--rule", nargs="+", metavar="OVERRIDE",
        help="method=... [method.*=...]: apply this method's rule to the run's tokens (no check against the record)",
    )  # fmt: skip
    args = parser.parse_args()
    try:
        result = check(args.run_dir, args.rule)
    except ConfigError as error:
        parser.error(str(error))
    if args.rule:
        print(f"{args.run_dir}: {result['samples']} samples under the rule of {' '.join(args.rule)}")
    else:
        print(
            f"{args.run_dir}: {result['samples']} samples, {len(result['mismatches'])} with recorded KV != the rule's"
        )
    for task_id, bad in result["mismatches"][:10]:
        print(f"  {task_id}: {bad}")
    for name in ("final", "peak"):
        print(
            f"reduction {name} by the rule: aggregate {result[f'reduction_{name}']:.4f}, "
            f"per-sample mean {result[f'reduction_{name}_per_sample']:.4f}"
        )


if __name__ == "__main__":
    main()
