"""Run a per-worker train loop as a Ray Train TorchTrainer, and the worker-side calls it needs.

The driver calls `fit`; the loop (plain PyTorch, in `workloads/`) calls `world`, `report` and
`latest_checkpoint` from here, so no workload imports Ray. Checkpoints every rank reports are
merged into one directory in the run's storage; a failed worker group restarts from the newest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer


@dataclass(frozen=True)
class WorkerScaling:
    """How many workers and what each one holds."""

    num_workers: int
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: int = 1
    accelerator_type: str | None = None

    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            resources["GPU"] = float(self.gpus_per_worker)
        return resources

    def total(self) -> dict[str, float]:
        return {k: v * self.num_workers for k, v in self.resources_per_worker().items()}


@dataclass(frozen=True)
class FitResult:
    checkpoint_dir: Path | None  # a local copy of the newest checkpoint
    metrics: dict
    storage_dir: str


def fit(
    train_fn: Callable[[dict], None],
    config: dict,
    *,
    name: str,
    storage_path: str,
    scaling: WorkerScaling,
    max_failures: int = 0,
    keep_checkpoints: int = 2,
    local_copy_to: Path | None = None,
) -> FitResult:
    """Run `train_fn(config)` on every worker; returns the newest checkpoint and rank 0's metrics."""
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker(),
            accelerator_type=scaling.accelerator_type,
            placement_strategy="PACK",
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )
    result = trainer.fit()
    checkpoint_dir = None
    if result.checkpoint is not None:
        if local_copy_to is not None:
            checkpoint_dir = Path(result.checkpoint.to_directory(str(local_copy_to)))
        elif "://" not in result.checkpoint.path:
            checkpoint_dir = Path(result.checkpoint.path)
    return FitResult(checkpoint_dir, dict(result.metrics or {}), str(result.path))


# -------------------------------------------------------------------------------------------
# Worker side: called from inside the train loop.
# -------------------------------------------------------------------------------------------


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) of this worker."""
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_local_rank(), ctx.get_world_size()


def report(metrics: dict, checkpoint_dir: str | os.PathLike | None = None) -> None:
    """Report metrics (a barrier across workers), with this rank's checkpoint files if given."""
    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


@contextlib.contextmanager
def latest_checkpoint() -> Iterator[Path | None]:
    """The newest checkpoint of this run (after a restart) as a local directory, or None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as path:
        yield Path(path)
