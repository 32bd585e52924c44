"""Gather finished eval runs (their ``metrics.json`` + ``config.yaml``) into one markdown table.

    python scripts/collect_runs.py outputs/eval/multirun_2026-12-01_23-00-00 outputs/eval/<dense run>
    python scripts/collect_runs.py outputs/eval --out results.md     # every finished run below a folder

One row per run: model, method and its budget options, benchmark, the benchmark's quality figure, and the
measured KV reduction (end of generation and peak) beside it. Unfinished runs (no metrics.json) are listed
as such, not dropped silently.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

METHOD_KEYS = ("compression_ratio", "max_tokens", "schedule", "skip_layers", "press")  # shown when present
QUALITY_KEYS = ("quality/ppl", "quality/accuracy", "pass@1")


def quality(metrics: dict) -> tuple[str, float | None]:
    for key in QUALITY_KEYS:
        if key in metrics:
            return key, metrics[key]
    found = next((k for k in metrics if k.startswith("pass@") or k.startswith("quality/")), None)
    return (found, metrics[found]) if found else ("-", None)


def method_label(method: dict) -> str:
    options = [f"{k}={method[k]}" for k in METHOD_KEYS if k in method and method[k] is not None]
    return method["name"] + (f" ({', '.join(options)})" if options else "")


def row(folder: Path) -> dict | None:
    config_file = folder / "config.yaml"
    if not config_file.exists():
        return None
    cfg = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    base = {
        "folder": str(folder),
        "model": cfg["model"]["name"],
        "method": method_label(cfg["method"]),
        "benchmark": cfg["benchmark"]["name"],
        "ratio": cfg["method"].get("compression_ratio", 0.0),
    }
    if metrics is None:
        return {**base, "finished": False}
    key, value = quality(metrics)
    return {
        **base,
        "finished": True,
        "n": metrics.get("n_samples"),
        "quality_key": key,
        "quality": value,
        "kv_reduction_final": metrics.get("kv/reduction_final"),
        "kv_reduction_peak": metrics.get("kv/reduction_peak"),
        "decode_tokens_per_s": metrics.get("speed/decode_tokens_per_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, or folders holding them")
    parser.add_argument("--out", type=Path, help="also write the table (and a .json of the rows) here")
    args = parser.parse_args()
    found = [p for f in args.folders for p in [f / "config.yaml", *f.rglob("config.yaml")] if p.exists()]
    folders = sorted({p.parent for p in found if ".hydra" not in p.parts})  # skip Hydra's own copies
    rows = [r for r in (row(f) for f in folders) if r is not None]
    rows.sort(key=lambda r: (r["benchmark"], r["method"].split(" ")[0], r["ratio"]))
    lines = [
        "| benchmark | method | n | quality | KV reduction (final) | KV reduction (peak) | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["finished"]:
            lines.append(f"| {r['benchmark']} | {r['method']} | unfinished: {r['folder']} | | | | |")
            continue
        value = "-" if r["quality"] is None else f"{r['quality_key']} {r['quality']:.4g}"
        speed = r["decode_tokens_per_s"]
        lines.append(
            f"| {r['benchmark']} | {r['method']} | {r['n']} | {value} | {r['kv_reduction_final']:.3f} | "
            f"{r['kv_reduction_peak']:.3f} | {'-' if speed is None else f'{speed:.1f}'} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
