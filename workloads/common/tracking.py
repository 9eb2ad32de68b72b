"""Experiment tracking chosen in the recipe (`tracking.backends`): TensorBoard, MLflow, W&B (offline).

Rank 0 of the train loop opens one `Tracker`, logs the resolved recipe once and every step's metrics,
and closes it; the other ranks hold a tracker with no backends. A metric has one name on every backend:
`train/<key>`, or `eval/<key>` for `eval_<key>`. A worker group restarted after a failure continues the
same runs: `Tracker.ids` go into the checkpoint, and TensorBoard drops the steps that are trained again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal, Protocol

from pydantic import Field, field_validator

from workloads.common.recipe import StrictModel

# Tracking backend -> (module it imports, what to pip install).
TRACKER_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "mlflow"),
                    "wandb": ("wandb", "wandb")}


class TrackingConfig(StrictModel):
    """Experiment trackers that rank 0 of training logs to: the resolved recipe once, metrics every step."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Any of tensorboard (event files), mlflow (a local file store unless "
        "mlflow_tracking_uri says otherwise), wandb (offline runs; sync them later with `wandb sync`)."
    )
    dir: str | None = Field(
        None, description="Where trackers write: tensorboard/, mlruns/, wandb/; null: `<run dir>/tracking` (emptied "
        "when a run starts fresh). On a multi-node cluster name a path every node shares."
    )
    experiment: str = Field("llmc", min_length=1, description="MLflow experiment and W&B project of the run.")
    mlflow_tracking_uri: str | None = Field(
        None, description="An MLflow tracking server (http://host:5000) or store URI; null: the file store "
        "`dir`/mlruns (MLflow 3 opens it only with MLFLOW_ALLOW_FILE_STORE=true, e.g. for `mlflow ui`)."
    )

    @field_validator("backends")
    @classmethod
    def _installed_once(cls, value: list[str]) -> list[str]:
        import importlib.util

        if len(set(value)) != len(value):
            raise ValueError("each backend may be named once")
        missing = [f"{b} needs the `{TRACKER_PACKAGES[b][0]}` module: pip install {TRACKER_PACKAGES[b][1]}"
                   for b in value if importlib.util.find_spec(TRACKER_PACKAGES[b][0]) is None]
        if missing:
            raise ValueError("; ".join(missing))
        return value


_MLFLOW_PARAMS_PER_CALL = 100  # MLflow's log_batch limits
_MLFLOW_METRICS_PER_CALL = 1000
_MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one param value


def tracking_dir(cfg: TrackingConfig, run_dir: Path) -> Path:
    """Where the trackers write: `tracking.dir`, else `<run dir>/tracking`."""
    return Path(cfg.dir).expanduser().resolve() if cfg.dir else run_dir / "tracking"


def reset(cfg: TrackingConfig, run_dir: Path) -> None:
    """A fresh run starts with an empty default tracking dir; a named one (maybe shared by runs) is left alone."""
    if cfg.dir is None:
        shutil.rmtree(tracking_dir(cfg, run_dir), ignore_errors=True)


def locations(cfg: TrackingConfig, directory: Path, run_name: str) -> dict[str, str]:
    """Backend -> where its run is written (a directory or a tracking URI), for the summary."""
    where = {"tensorboard": str(directory / "tensorboard" / run_name), "mlflow": _mlflow_uri(cfg, directory),
             "wandb": str(directory / "wandb")}
    return {backend: where[backend] for backend in cfg.backends}


def metric_name(key: str) -> str:
    """`eval_loss` -> `eval/loss`, `loss` -> `train/loss`: the same name on every backend."""
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """A nested recipe as dotted keys -> strings (lists as JSON), the form every backend takes params in."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def _scalars(metrics: dict) -> dict[str, float]:
    return {metric_name(k): float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class _Backend(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self, failed: bool) -> None: ...


class Tracker:
    """The recipe's backends behind one interface: params once, metrics per step, close at the end (or leave a
    `with` block: an exception marks the runs failed)."""

    def __init__(self, backends: dict[str, _Backend] | None = None):
        self._backends = backends or {}

    @property
    def ids(self) -> dict[str, str]:
        """Backend -> run id, for backends whose run a restarted worker must reopen (MLflow, W&B)."""
        return {name: b.run_id for name, b in self._backends.items() if b.run_id}

    def log_params(self, params: dict) -> None:
        """The resolved recipe (nested dicts are flattened to dotted keys)."""
        flat = flatten(params)
        for backend in self._backends.values():
            backend.log_params(flat)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """One step's numeric metrics (None, bools and the step itself are skipped)."""
        scalars = _scalars(metrics)
        for backend in self._backends.values():
            backend.log_metrics(scalars, step)

    def close(self, failed: bool = False) -> None:
        for backend in self._backends.values():
            backend.close(failed)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def open_tracker(cfg: TrackingConfig, directory: Path, run_name: str, *, start_step: int = 0,
                 resume_ids: dict[str, str] | None = None) -> Tracker:
    """Open the recipe's backends under `directory` (from `tracking_dir`); `start_step` and `resume_ids` say
    where a restarted run continues."""
    resume_ids = resume_ids or {}
    openers = {
        "tensorboard": lambda: _TensorBoard(directory / "tensorboard" / run_name, start_step),
        "mlflow": lambda: MLflowRun(_mlflow_uri(cfg, directory), cfg.experiment, run_name, resume_ids.get("mlflow")),
        "wandb": lambda: _WandB(directory, cfg.experiment, run_name, resume_ids.get("wandb")),
    }
    if cfg.backends:
        directory.mkdir(parents=True, exist_ok=True)
    return Tracker({name: openers[name]() for name in cfg.backends})


class _TensorBoard:
    run_id = None

    def __init__(self, logdir: Path, start_step: int):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard discards what an earlier attempt logged from this step on (a restart).
        self._writer = SummaryWriter(logdir=str(logdir), purge_step=start_step + 1 if start_step else None,
                                     flush_secs=10)

    def log_params(self, params: dict[str, str]) -> None:
        self._writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in params.items()))  # indented: code

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)

    def close(self, failed: bool) -> None:
        self._writer.close()


def _mlflow_uri(cfg: TrackingConfig, directory: Path) -> str:
    return cfg.mlflow_tracking_uri or (directory / "mlruns").as_uri()


class MLflowRun:
    """One MLflow run: created in `experiment` (made with `artifact_location` if new), or `run_id` reopened if it
    exists; params once (chunked and cut to MLflow's limits), metrics per step, closed with its status. The tracking
    backend of the train loop, and the run `workloads.common.record` leaves for every `llmc` command."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None, *,
                 artifact_location: str | None = None, tags: dict[str, str] | None = None):
        if uri.startswith("file:"):  # MLflow 3 refuses its file store (maintenance mode) unless told to allow it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.run_id = run_id if run_id and self._exists(run_id) else None
        if self.run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found
                             else self.client.create_experiment(experiment, artifact_location=artifact_location))
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params  # a continued run keeps what it was started with
        items = [Param(k, v[:_MLFLOW_PARAM_CHARS]) for k, v in params.items() if k not in logged]
        for start in range(0, len(items), _MLFLOW_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[start : start + _MLFLOW_PARAMS_PER_CALL])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for start in range(0, len(items), _MLFLOW_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=items[start : start + _MLFLOW_METRICS_PER_CALL])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class _WandB:
    def __init__(self, directory: Path, project: str, run_name: str, run_id: str | None):
        import wandb

        # Offline only: runs are written under `directory`/wandb; `wandb sync` uploads them later.
        self._run = wandb.init(project=project, name=run_name, dir=str(directory), mode="offline", id=run_id,
                               resume="allow" if run_id else None, reinit="finish_previous")
        self.run_id = self._run.id

    def log_params(self, params: dict[str, str]) -> None:
        self._run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)
