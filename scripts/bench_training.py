"""Training throughput of the anchor methods against dense, measured by real train.py runs.

Each method trains for ``--steps`` optimizer steps on the same model, data and sequence length
(LoRA by default, as in the recovery experiment); tokens/s is read from the run's own log
(``train_log.jsonl``), leaving out the first logging interval (start-up, first allocations).
Methods run in turns for ``--rounds`` rounds, so a slow patch of the machine hits all of them.

    python scripts/bench_training.py                                    # SmolLM2, seq_len 1024
    python scripts/bench_training.py --steps 12 data.seq_len=2048 trainer=full
    python scripts/bench_training.py --methods dense anchorcoder model=tiny-llama --steps 4
    python scripts/bench_training.py --methods dense anchorcoder anchorcoder:distill   # method:objective

Writes ``bench_training.json`` (and prints a table) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(hydra_compose(config_name="train", overrides=overrides), resolve=True)


def tokens_per_s(run: Path) -> float:
    entries = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_s"] for e in entries if "tokens_per_s" in e][1:]  # skip the warm-up interval
    if not rates:
        raise SystemExit(f"{run}: too few logging intervals; raise --steps")
    return statistics.mean(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["dense", "anchorcoder", "anllm"])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="outputs/bench_training")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (model=..., data.seq_len=...)")
    args = parser.parse_args()

    from anchorcoder.reporting import print_table
    from anchorcoder.training import run_train

    out = Path(args.out)
    fixed = [
        "logger=none", f"trainer.max_steps={args.steps}", "trainer.logging_steps=2", "trainer.eval_steps=0",
        f"trainer.save_steps={args.steps}", "data.validation_fraction=0",
    ]  # fmt: skip
    rates: dict[str, list[float]] = {m: [] for m in args.methods}
    config = {}
    for r in range(args.rounds):
        for method in args.methods:
            run = out / f"round{r}_{method.replace(':', '_')}"
            shutil.rmtree(run, ignore_errors=True)  # a fresh run each time
            name, _, objective = method.partition(":")  # anchorcoder:distill = trainer.objective=distill
            cfg = compose([*fixed, f"method={name}", f"trainer.objective={objective or 'ce'}", *args.overrides])
            config = {"model": cfg["model"]["name"], "trainer": cfg["trainer"]["name"], "seq_len": cfg["data"]["seq_len"],
                      "batch_size": cfg["trainer"]["batch_size"], "steps": args.steps}  # fmt: skip
            run_train(cfg, run)
            rates[method].append(tokens_per_s(run))
    dense = statistics.median(rates["dense"]) if "dense" in rates else None
    result = {"config": config, "tokens_per_s": rates}
    table = {}
    for method, values in rates.items():
        median = statistics.median(values)
        ratio = f"  ({median / dense:.2f}x dense)" if dense else ""
        table[method] = f"{median:.1f} tok/s{ratio}"
        if dense:
            result.setdefault("ratio_to_dense", {})[method] = median / dense
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_training.json").write_text(json.dumps(result, indent=2))
    title = f"training tokens/s: {config['model']}, {config['trainer']}, {config['batch_size']} x {config['seq_len']} tokens"
    print_table(title, table, caption=f"{args.steps} steps x {args.rounds} round(s); first logging interval left out")


if __name__ == "__main__":
    main()
