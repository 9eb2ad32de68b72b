"""Run a search on Ray Tune: a plain-Python trial function over a grid, ASHA stopping weak trials early.

The trial function is handed its config and a `report(metrics)` callable; it knows nothing of Tune. Each trial
shows in the Ray dashboard as a Tune trial of the experiment `name`; every report's metrics come back per trial.
A trial that trains is a driver: it fits a Ray Train run (`cluster.train.fit`) with `train_reporter`, which
hands that run's reports to Tune instead of `report` (Ray's Train V2 + Tune pattern).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from cluster.runtime import verbose

Report = Callable[[dict[str, Any]], None]
CHECKPOINT_PATH = CHECKPOINT_PATH_KEY  # in a trial's report that came with a checkpoint (train_reporter): its path


@dataclass
class TrialOutcome:
    """One trial: its config, every report it made (in order), and how it ended."""

    trial_id: str
    config: dict[str, Any]
    reports: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    error: str | None = None

    @property
    def last(self) -> dict[str, Any]:
        return self.reports[-1] if self.reports else {}


def grid(space: dict[str, list]) -> dict[str, Any]:
    """A Tune param space that tries every combination of the listed values."""
    return {key: tune.grid_search(list(values)) for key, values in space.items()}


def train_reporter(metric: str) -> UserCallback:
    """Inside a trial: a Ray Train callback that sends rank 0's reports carrying `metric` (the evaluations) to Tune.

    Tune refuses a result without its metric, and a train loop also reports between evaluations."""
    return _MetricReports(metric)


class _MetricReports(TuneReportCallback):
    """Ray's Train-to-Tune callback (it runs in the Train controller), for the reports that carry `metric` only."""

    def __init__(self, metric: str):
        super().__init__()
        self._metric = metric

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics and self._metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def local_checkpoint(path: str, copy_to: Path) -> Path:
    """A checkpoint a trial's Train run reported (its `checkpoint_path`) as a local directory: copied to `copy_to`
    from remote storage (s3://...), else where it lies."""
    if "://" not in path:
        return Path(path)
    return Path(ray.train.Checkpoint(path).to_directory(str(copy_to)))


def trials_that_fit(per_trial: dict[str, float]) -> int:
    """How many trials, each holding `per_trial` resources (e.g. {"CPU": 2}), the connected cluster runs at once."""
    total = ray.cluster_resources()
    return max(1, min(int(total.get(key, 0) // amount) for key, amount in per_trial.items() if amount > 0))


def run_search(trial: Callable[[dict[str, Any], Report], None], param_space: dict[str, Any], *, name: str,
               storage_path: str, metric: str, mode: str = "max", time_attr: str | None = None,
               max_t: int = 100, grace_period: int = 1, reduction_factor: float = 2, num_samples: int = 1,
               max_concurrent_trials: int = 4, cpus_per_trial: float = 1.0, reuse_actors: bool = False,
               trial_length: Callable[[dict[str, Any]], int] | None = None) -> list[TrialOutcome]:
    """Every trial of the search; with `time_attr` (a reported, increasing resource) ASHA stops weak ones early.

    A trial counts as stopped early when its last report is below its own length: `trial_length(config)` where
    trials differ in length, else `max_t`. `reuse_actors`: an actor that ends a trial runs the next one, for light
    trials whose process start and imports (~2.5 s of CPU each) outweigh their own work."""
    scheduler = (ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                               reduction_factor=reduction_factor) if time_attr else FIFOScheduler())

    def trainable(config: dict[str, Any]) -> None:
        trial(config, lambda metrics: tune.report(dict(metrics)))

    loud = verbose()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent_trials, reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=name, storage_path=os.path.abspath(storage_path), verbose=1 if loud else 0),
    )
    # Tune's newer console output prints its experiment heading and paths even at verbose=0; the classic
    # reporter is silent at 0. Quiet unless --verbose (our own table is the output).
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if loud else "0"
    try:
        results = tuner.fit()
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous
    outcomes = []
    for result in results:
        history = result.metrics_dataframe
        reports = history.to_dict("records") if history is not None else []
        last_t = reports[-1].get(time_attr) if reports and time_attr else None
        config = dict(result.config or {})
        length = trial_length(config) if trial_length else max_t
        outcomes.append(TrialOutcome(
            trial_id=result.metrics.get("trial_id", "") if result.metrics else "",
            config=config, reports=reports,
            stopped_early=bool(time_attr) and result.error is None and last_t is not None and last_t < length,
            error=repr(result.error) if result.error else None,
        ))
    return outcomes
