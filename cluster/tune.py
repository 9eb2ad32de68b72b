"""Run a search on Ray Tune: a plain-Python trial function over a grid, ASHA stopping weak trials early.

The trial function is handed its config and a `report(metrics)` callable; it knows nothing of Tune. Each trial
shows in the Ray dashboard as a Tune trial of the experiment `name`; every report's metrics come back per trial.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from cluster.runtime import verbose

Report = Callable[[dict[str, Any]], None]


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


def run_search(trial: Callable[[dict[str, Any], Report], None], param_space: dict[str, Any], *, name: str,
               storage_path: str, metric: str, mode: str = "max", time_attr: str | None = None,
               max_t: int = 100, grace_period: int = 1, reduction_factor: float = 2, num_samples: int = 1,
               max_concurrent_trials: int = 4, cpus_per_trial: float = 1.0) -> list[TrialOutcome]:
    """Every trial of the search; with `time_attr` (a reported, increasing resource) ASHA stops weak ones early."""
    scheduler = (ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                               reduction_factor=reduction_factor) if time_attr else FIFOScheduler())

    def trainable(config: dict[str, Any]) -> None:
        trial(config, lambda metrics: tune.report(dict(metrics)))

    loud = verbose()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent_trials),
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
        outcomes.append(TrialOutcome(
            trial_id=result.metrics.get("trial_id", "") if result.metrics else "",
            config=dict(result.config or {}), reports=reports,
            stopped_early=bool(time_attr) and result.error is None and last_t is not None and last_t < max_t,
            error=repr(result.error) if result.error else None,
        ))
    return outcomes
