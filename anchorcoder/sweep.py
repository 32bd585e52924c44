"""The end of an ``eval.py -m`` sweep (see ``hydra_plugins/anchorcoder_sweeper``): its report, and its
W&B summary run."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def finish_sweep(config, sweep_dir: Path) -> None:
    """The sweep's report (``report.md`` + plots in the sweep folder) and, with ``logger=wandb``, one
    summary W&B run in the sweep's group holding the table and the plots."""
    from anchorcoder.reporting.compare import write_report

    runs, images = write_report([sweep_dir], sweep_dir)
    log.info("sweep report: %s", sweep_dir / "report.md")
    logger = OmegaConf.to_container(config.get("logger") or {}, resolve=True)
    if logger.get("name") != "wandb" or logger.get("mode") == "disabled" or not runs:
        return
    from anchorcoder.tracking import build_tracker

    tracker = build_tracker({**logger, "group": logger.get("group") or sweep_dir.name})
    tracker.start(
        {"sweep_dir": str(sweep_dir)},
        run_name=f"{sweep_dir.name}/summary",
        output_dir=str(sweep_dir),
        job_type="summary",
    )
    try:
        rows = [r.row() for r in runs]
        columns = [
            "benchmark",
            "model",
            "method",
            "options",
            "adapter",
            "finished",
            "quality_key",
            "quality",
            "interval_low",
            "interval_high",
            "kv_reduction_final",
            "kv_reduction_peak",
            "decode_tokens_per_s",
            "wall_s",
            "vs_dense_better",
            "vs_dense_worse",
            "vs_dense_p",
            "folder",
        ]
        table = []
        for r in rows:
            m, c, interval = r["metrics"], r["vs_dense"] or {}, r["interval"] or [None, None]
            table.append(
                [
                    r["benchmark"],
                    r["model"],
                    r["method"],
                    r["options"],
                    r["adapter"],
                    r["finished"],
                    r["quality_key"],
                    r["quality"],
                    *interval,
                    m.get("kv/reduction_final"),
                    m.get("kv/reduction_peak"),
                    m.get("speed/decode_tokens_per_s"),
                    m.get("run/wall_s"),
                    c.get("a_better"),
                    c.get("b_better"),
                    c.get("p"),
                    r["folder"],
                ]
            )
        tracker.log_table("comparison", columns, table, always=True)
        tracker.log_images({p.stem: p for p in images})
        tracker.log_metrics({"sweep/jobs": len(runs), "sweep/finished": sum(r.finished for r in runs)})
        tracker.finish()
    except BaseException:
        tracker.finish(failed=True)
        raise
