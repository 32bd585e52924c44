"""Experiment trackers (``logger=none|wandb``): one registry, one small interface.

A tracker receives the resolved config at start, then metrics (a flat dict) and a table of
per-sample rows, and is always finished, even when the run fails (so multiruns keep going).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import ClassVar

from anchorcoder.registry import LOGGERS, ConfigError


@dataclass
class Tracker:
    name: ClassVar[str] = "base"

    def start(self, config: dict, run_name: str, output_dir: str, job_type: str) -> None: ...

    def log_metrics(self, metrics: dict) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list], always: bool = False) -> None: ...

    def log_images(self, images: dict) -> None: ...

    def log_artifact(self, path: str, name: str, kind: str) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


@LOGGERS.register("none")
@dataclass
class NoTracker(Tracker):
    name = "none"


@LOGGERS.register("wandb")
@dataclass
class WandbTracker(Tracker):
    """Weights & Biases; ``offline`` by default (files under the run folder, `wandb sync` them later)."""

    name = "wandb"
    mode: str = "offline"  # offline | online | disabled
    project: str = "anchorcoder"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_generations: bool = True  # a table of every sample (prompt id, completion, KV figures)

    def __post_init__(self):
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.mode must be offline, online or disabled; got '{self.mode}'")
        if importlib.util.find_spec("wandb") is None:  # refuse before any run folder is written
            raise ConfigError("logger=wandb needs the wandb package: `pip install -e .[tracking]`, or use logger=none")
        self._run = None

    def start(self, config, run_name, output_dir, job_type):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=[*self.tags, *describe_tags(config)],
            name=run_name,
            job_type=job_type,
            mode=self.mode,
            dir=output_dir,
            config=config,
            settings=wandb.Settings(silent=True),
        )

    def log_metrics(self, metrics):
        self._run.log(metrics)
        self._run.summary.update(metrics)

    def log_table(self, key, columns, rows, always=False):
        if self.log_generations or always:
            self._run.log({key: self._wandb.Table(columns=columns, data=rows)})

    def log_images(self, images):
        self._run.log({key: self._wandb.Image(str(path)) for key, path in images.items()})

    def log_artifact(self, path, name, kind):
        artifact = self._wandb.Artifact(name=name.replace("/", "-"), type=kind)
        artifact.add_dir(path)
        self._run.log_artifact(artifact)

    def finish(self, failed=False):
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None


def describe_tags(config: dict) -> list[str]:
    """``method:<name>``, ``benchmark:<name>``, ``model:<name>`` (and ``trained``) for a run's config."""
    tags = [
        f"{key}:{config[key]['name']}" for key in ("method", "benchmark", "model") if isinstance(config.get(key), dict)
    ]
    if isinstance(config.get("model"), dict) and config["model"].get("adapter"):
        tags.append("trained")
    return tags


def build_tracker(cfg: dict) -> Tracker:
    return LOGGERS.build(cfg)
