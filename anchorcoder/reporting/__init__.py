"""Aggregate per-sample records into the run's metrics, and print them as a table."""

from __future__ import annotations

from statistics import mean


def kv_and_speed_metrics(records: list[dict], stats, hidden: frozenset[int] = frozenset()) -> dict:
    """The KV and speed keys every evaluation reports (see DESIGN.md, 'Measuring'). Token counts
    leave out ``hidden`` (tokens the method inserted, e.g. span sentinels).

    Reductions compare bytes actually held with the dense-equivalent bytes of the same samples:
    ``1 - sum(held) / sum(dense)``, at the end of generation and at each sample's peak.
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
        "kv/tensor_bytes_peak": stats.kv_tensor_bytes_peak,
        "gen/prompt_tokens_mean": mean(sum(t not in hidden for t in r["prompt_token_ids"]) for r in records),
        "gen/new_tokens_mean": mean(sum(t not in hidden for t in r["token_ids"]) for r in records),
    }
    if stats.prefill_s:  # absent when every sample came from an earlier invocation without timings
        metrics["speed/prefill_s_mean"] = mean(stats.prefill_s)
        metrics["speed/prefill_tokens_per_s"] = stats.prefill_tokens / sum(stats.prefill_s)
        metrics["speed/decode_tokens_per_s"] = stats.decode_tokens / stats.decode_s if stats.decode_s else 0.0
        metrics["speed/wall_s"] = stats.wall_s
    if stats.cuda_prefill_max_allocated is not None:
        metrics["cuda/prefill_max_allocated_bytes"] = stats.cuda_prefill_max_allocated
        metrics["cuda/decode_max_allocated_bytes"] = stats.cuda_decode_max_allocated
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
