"""The end of an ``eval.py -m`` sweep (see ``hydra_plugins/anchorcoder_sweeper``): its report, and its
W&B summary run."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def finish_sweep(config, sweep_dir: Path, failed: list[str] = ()) -> None:
    """The sweep's report (``report.md`` + plots in the sweep folder, failed jobs listed) and, with
    ``logger=wandb``, one summary W&B run in the sweep's group holding the table and the plots."""
    from anchorcoder.reporting.compare import flat_row, write_report

    runs, images = write_report([sweep_dir], sweep_dir)
    if failed:
        with (sweep_dir / "report.md").open("a") as report:
            report.write("\n## Failed jobs\n\n" + "".join(f"- {line}\n" for line in failed))
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
        rows = [flat_row(r) for r in runs]
        tracker.log_table("comparison", list(rows[0]), [list(r.values()) for r in rows], always=True)
        tracker.log_images({p.stem: p for p in images})
        tracker.log_metrics(
            {"sweep/runs": len(runs), "sweep/finished": sum(r.finished for r in runs), "sweep/failed_jobs": len(failed)}
        )
        tracker.finish()
    except BaseException:
        tracker.finish(failed=True)
        raise
