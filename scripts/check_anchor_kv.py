"""Check an anchor method's eval run: the KV entries and bytes the engine recorded for every sample
must equal what the rule keeps for the tokens that sample fed (past anchors + the open segment), at
the end of generation and at the peak (the prompt before its first pruning, or a step before pruning).

    python scripts/check_anchor_kv.py outputs/eval/<run folder>

Reads the run's ``config.yaml`` and ``generations.jsonl``; prints the counts and the reductions.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from anchorcoder.generation.engine import model_kv_shape
from anchorcoder.methods import build_method
from anchorcoder.methods.anchors import kept_count
from anchorcoder.models import load_model


def expected_entries(stream: list[bool], prompt_len: int, sink: int) -> tuple[int, int]:
    """(final, peak) entries per layer and KV head for a fed stream of anchor flags."""
    peak = prompt_len  # the whole prompt is held before the prefill's pruning
    for t in range(prompt_len + 1, len(stream) + 1):  # a decode step holds the pruned past + the new token
        peak = max(peak, kept_count(stream[: t - 1], sink) + 1)
    return kept_count(stream, sink), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    cfg = OmegaConf.to_container(OmegaConf.load(args.run_dir / "config.yaml"), resolve=True)
    loaded = load_model(cfg["model"], device="cpu")
    method = build_method(cfg["method"])
    method.prepare(loaded.model, loaded.tokenizer)
    anchors = set(method.anchor_ids)
    layers, kv_heads, head_dim = model_kv_shape(loaded.model)
    per_token = layers * kv_heads
    bytes_per_entry = 2 * head_dim * loaded.model.dtype.itemsize

    mismatches, reductions_final, reductions_peak, n = [], [], [], 0
    for line in (args.run_dir / "generations.jsonl").read_text().splitlines():
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
        reductions_final.append(1 - kv["bytes_final"] / kv["dense_bytes_final"])
        reductions_peak.append(1 - kv["bytes_peak"] / kv["dense_bytes_peak"])
        n += 1
    print(f"{args.run_dir}: {n} samples, {len(mismatches)} with recorded KV != the rule's kept count")
    for task_id, bad in mismatches[:10]:
        print(f"  {task_id}: {bad}")
    print(
        f"per-sample mean reduction: final {statistics.mean(reductions_final):.4f}, "
        f"peak {statistics.mean(reductions_peak):.4f}"
    )


if __name__ == "__main__":
    main()
