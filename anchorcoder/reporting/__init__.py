"""Aggregate per-sample records into the run's metrics, and print them as a table."""

from __future__ import annotations

from statistics import mean


def kv_and_speed_metrics(records: list[dict], lanes, hidden: frozenset[int] = frozenset()) -> dict:
    """The KV and speed keys every evaluation reports (see DESIGN.md, 'Measuring'). Token counts
    leave out ``hidden`` (tokens the method inserted, e.g. span sentinels).

    Reductions compare bytes actually held with the dense-equivalent bytes of the same samples:
    ``1 - sum(held) / sum(dense)``, at the end of generation and at each sample's peak.

    ``lanes``: the engine's ``RunStats`` of each process that generated (one, or one per rank of a
    data-parallel run): throughputs add up over processes, wall time is the slowest one's, memory
    figures the largest.
    """
    kv = [r["kv"] for r in records]
    held_final = sum(k["bytes_final"] for k in kv)
    held_peak = sum(k["bytes_peak"] for k in kv)
    dense_final = sum(k["dense_bytes_final"] for k in kv)
    dense_peak = sum(k["dense_bytes_peak"] for k in kv)
    metrics = {
        "n_samples": len(records),
        "kv/entries_final_mean": mean(k["entries_final"] for k in kv),
        "kv/bytes_final_mean": mean(k["bytes_final"] for k in kv),
        "kv/bytes_peak_mean": mean(k["bytes_peak"] for k in kv),
        "kv/bytes_peak_max": max(k["bytes_peak"] for k in kv),
        "kv/dense_bytes_final_mean": mean(k["dense_bytes_final"] for k in kv),
        "kv/reduction_final": 1 - held_final / dense_final,
        "kv/reduction_peak": 1 - held_peak / dense_peak,
        "kv/tensor_bytes_peak": max((s.kv_tensor_bytes_peak for s in lanes), default=0),
        "gen/prompt_tokens_mean": mean(sum(t not in hidden for t in r["prompt_token_ids"]) for r in records),
        "gen/new_tokens_mean": mean(sum(t not in hidden for t in r["token_ids"]) for r in records),
    }
    timed = [s for s in lanes if s.prefill_s]  # none when every sample came from an earlier invocation without timings
    if timed:
        metrics["speed/prefill_s_mean"] = mean(t for s in timed for t in s.prefill_s)
        metrics["speed/prefill_tokens_per_s"] = sum(s.prefill_tokens / sum(s.prefill_s) for s in timed)
        metrics["speed/decode_tokens_per_s"] = sum(s.decode_tokens / s.decode_s for s in timed if s.decode_s)
        metrics["speed/wall_s"] = max(s.wall_s for s in timed)
        metrics["speed/processes"] = len(timed)
    cuda = [s for s in lanes if s.cuda_prefill_max_allocated is not None]
    if cuda:
        metrics["cuda/prefill_max_allocated_bytes"] = max(s.cuda_prefill_max_allocated for s in cuda)
        metrics["cuda/decode_max_allocated_bytes"] = max(s.cuda_decode_max_allocated for s in cuda)
    return metrics


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def print_table(title: str, metrics: dict, caption: str | None = None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, _fmt(value))
    (console or Console()).print(table)
