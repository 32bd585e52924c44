"""``eval.py -m``'s sweeper (Hydra loads sweepers only from ``hydra_plugins``): named grids of whole
jobs, every job validated before the first one runs, and a comparison report (plus a W&B summary run)
when the sweep ends.

Hydra's basic sweeper crosses every swept key with every other, so ``method=dense,l2norm
method.compression_ratio=0.5`` fails on dense (it has no ratio). Here a grid is made of *points*: one
point is the overrides of one kind of job (``method=l2norm method.compression_ratio=0.25,0.5``; a
comma list inside a point sweeps within that point only). ``axes`` are lists of points crossed with
each other; ``extra`` points are added once each; the command line's own overrides (and comma sweeps)
apply to every job::

    python eval.py -m +sweep=pareto benchmark=humaneval
    python eval.py -m +sweep=pareto benchmark=code_ppl,code_needle adapters.anchorcoder=outputs/train/<run>

A point holding ``@{key}`` takes that key's value from the composed config and is left out while the
value is null: a trained row appears when its adapter is given.
"""

from __future__ import annotations

import itertools
import logging
import re
import shlex
from functools import partial
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from anchorcoder.distributed import launched_ranks
from anchorcoder.registry import ConfigError
from anchorcoder.sweep import finish_sweep

log = logging.getLogger(__name__)


def _key(override: str) -> str:
    """The config key an override sets (``+a.b=1``, ``++a.b=1``, ``~a.b`` and ``a.b=1`` all set ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


class SweepError(CompactHydraException):
    """Printed as its message alone (no traceback), like Hydra's own config errors."""


PLACEHOLDER = re.compile(r"@\{([^}]+)\}")


class GridSweeper(BasicSweeper):
    def __init__(self, max_batch_size=None, params=None, axes=None, extra=None, report=True, dry_run=False):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.dry_run = dry_run
        self.axes = {name: list(points) for name, points in (axes or {}).items() if points}
        self.extra = list(extra or [])
        self.report = report

    # ------------------------------------------------------------------------------ the job list
    def _expand(self, overrides: list[str]) -> list[list[str]]:
        """Every job of a list of overrides (comma sweeps crossed), as Hydra's basic sweeper would."""
        if not overrides:
            return [[]]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        return self.split_arguments(parser.parse_overrides(overrides), None)[0]

    def _point(self, point: str) -> list[str] | None:
        """A point's overrides with its ``@{key}`` filled in; None when a key it names is null."""
        missing = []

        def fill(match):
            value = OmegaConf.select(self.config, match.group(1), default=None)
            if value is None:
                missing.append(match.group(1))
            return str(value)

        filled = PLACEHOLDER.sub(fill, point)
        if missing:
            log.info("sweep: left out `%s` (%s not given)", point, ", ".join(missing))
            return None
        return shlex.split(filled)

    def jobs(self, arguments: list[str]) -> list[list[str]]:
        """The overrides of every job: the axes crossed, then ``extra``, each with the command line's."""
        command_line = self._expand([*self._parse_config(), *arguments])
        axes = []
        for name, points in self.axes.items():
            kept = [p for p in map(self._point, points) if p is not None]
            if not kept:
                raise SweepError(f"error: every point of the sweep's axis '{name}' was left out (their keys are null)")
            axes.append(kept)
        bases = [combo for combo in itertools.product(*axes)] if axes else ([] if self.extra else [()])
        bases += [(p,) for p in map(self._point, self.extra) if p is not None]
        jobs = []
        for parts in bases:
            seen = {}
            for part in parts:  # two axes may not set the same key: one would silently win
                for key in map(_key, part):
                    if key in seen and seen[key] is not part:
                        raise SweepError(f"error: two axes of the sweep both set {key}")
                    seen[key] = part
            for inner in self._expand(sum(parts, [])):
                for outer in command_line:
                    clash = sorted(set(map(_key, inner)) & set(map(_key, outer)))
                    if clash:
                        raise SweepError(
                            f"error: the sweep's grid already sets {', '.join(clash)}; leave it off the command line "
                            "or pick another grid (configs/sweep/)"
                        )
                    jobs.append([*inner, *outer])
        if not jobs:
            raise SweepError("error: the sweep has no jobs (every extra point was left out)")
        return jobs

    def validate_jobs(self, jobs: list[list[str]]) -> None:
        """Compose every job and run the task's own checks (config values, data files, model folders),
        so a bad job stops the sweep before any model loads, not after hours of earlier jobs."""
        from anchorcoder.evaluation import validate
        from anchorcoder.models import locate_model

        checked = set()
        for number, overrides in enumerate(jobs):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            if cfg.get("task_name") != "eval":
                continue
            container = OmegaConf.to_container(cfg, resolve=False)
            container.pop("hydra", None)
            container = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
            try:
                parts = validate(container)
                for kind, section, check in (
                    ("benchmark", container["benchmark"], parts.benchmark.preload),
                    ("model", container["model"], partial(locate_model, container["model"])),
                ):
                    key = (kind, repr(sorted(section.items())))
                    if key not in checked:  # each data file and model folder once
                        check()
                        checked.add(key)
            except ConfigError as error:
                raise SweepError(f"error: sweep job {number} ({' '.join(overrides)}): {error}") from None

    # ------------------------------------------------------------------------------------ the run
    def sweep(self, arguments: list[str]):
        if launched_ranks().parallel:
            raise SweepError(
                "error: a sweep runs under one process; start it with python, not torchrun / accelerate launch "
                "(to spread its jobs over GPUs or nodes: hydra/launcher=local or hydra/launcher=slurm)"
            )
        jobs = self.jobs(arguments)
        self.validate_jobs(jobs)
        if self.dry_run:
            print(f"{len(jobs)} jobs, every one composed and validated:")
            print("\n".join(f"  {i}: {' '.join(job)}" for i, job in enumerate(jobs)))
            return []
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info("sweep: %d jobs into %s", len(jobs), sweep_dir)
        size = self.max_batch_size or len(jobs)
        failed, returns = [], []
        for start in range(0, len(jobs), size):
            results = self.launcher.launch(jobs[start : start + size], initial_job_idx=start)
            returns.append(results)
            for number, result in enumerate(results, start):
                if result.status == JobStatus.FAILED:
                    error = result._return_value
                    log.error("sweep job %d failed", number, exc_info=(type(error), error, error.__traceback__))
                    failed.append(f"job {number} ({' '.join(result.overrides)}): {error!r}")
        if self.report:
            try:
                finish_sweep(self.config, sweep_dir, failed)
            except Exception:  # the jobs' own folders hold every result; `python -m anchorcoder.report` redoes it
                log.exception("sweep: the report failed (redo it with python -m anchorcoder.report %s)", sweep_dir)
        if failed:
            raise SweepError(f"{len(failed)} of {len(jobs)} sweep jobs failed:\n  " + "\n  ".join(failed))
        return returns
