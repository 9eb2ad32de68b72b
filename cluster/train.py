"""Run a per-worker train loop as a Ray Train TorchTrainer, and the worker-side calls it needs.

The driver calls `fit`; the loop (plain PyTorch, in `workloads/`) calls `world`, `report`,
`publish` and `latest_checkpoint` from here, so no workload imports Ray. Checkpoints every rank
reports are merged into one directory in the run's storage; a failed worker group restarts from the
newest. The run is named after the recipe's run (the dashboard, Ray Train's own metrics and ours,
`llmc_train_*{run=NAME}`, all carry that name).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback, WorkerGroupError
from ray.train.torch import TorchConfig, TorchTrainer

from cluster import _ray_private, metrics

# Ray Train V2 keeps this file in `storage_path/name` and continues any run it finds there.
_SNAPSHOT = "checkpoint_manager_snapshot.json"
_HEALTH_CHECK_INTERVAL_S = 0.5  # Ray Train's controller polls the workers this often
ABORT_TIMEOUT_S = 60  # a stopped run's controller gets this long to end its workers, then it is killed


@dataclass(frozen=True)
class WorkerScaling:
    """How many workers, what each one holds (computed by the caller's plan), and where they go."""

    num_workers: int
    resources_per_worker: dict[str, float]  # e.g. {"CPU": 8, "GPU": 1}; Ray adds the accelerator type itself
    use_gpu: bool = False
    accelerator_type: str | None = None
    placement_strategy: str = "PACK"


@dataclass(frozen=True)
class FitResult:
    checkpoint_dir: Path | None  # a local copy of the newest checkpoint
    metrics: dict
    storage_dir: str
    best_checkpoint_dir: Path | None = None  # with `keep_best_by`: a local copy of the best-scored checkpoint


def fit(
    train_fn: Callable[[dict], None],
    config: dict,
    *,
    name: str,
    storage_path: str,
    scaling: WorkerScaling,
    max_failures: int = 0,
    keep_checkpoints: int = 2,
    keep_best_by: tuple[str, str] | None = None,
    local_copy_to: Path | None = None,
    on_report: Callable[[dict], None] | None = None,
    resume: bool = False,
    callbacks: Sequence[UserCallback] = (),
    shared: dict[str, Any] | None = None,
    prepare: Callable[[], dict] | None = None,
    datasets: dict[str, Any] | None = None,
) -> FitResult:
    """Run `train_fn(config)` on every worker; returns the newest checkpoint and rank 0's metrics.

    `keep_best_by=(metric, "max" or "min")`: storage keeps the `keep_checkpoints` best checkpoints by that
    reported metric (always with the newest), not the newest ones, and the result names the best. Every
    checkpoint's report must carry the metric. With `local_copy_to` (remote storage), the best is copied
    beside it, into `<local_copy_to>_best`.

    `on_report(metrics)` is called in this process with rank 0's metrics after every `report`: the
    controller forwards them through a queue actor, so the driver can show progress without worker logs.
    `callbacks`: more Ray Train callbacks for the run (e.g. `cluster.tune.train_reporter` inside a Tune trial).
    `shared`: values every worker needs (e.g. the tokenized dataset), put in the object store once (or already
    there: `share`) and handed to `train_fn` in its config under their keys, instead of made again by each worker;
    a `per_rank` value hands each worker only its own share (rank r reads the r-th, and only that one).
    `prepare()`: called before the first start and before every restart (e.g. role actors health-checked and a dead
    one replaced: `cluster.actors.ensure`); what it returns is merged into that attempt's config.
    `datasets`: Ray Data datasets by name (`cluster.data`), each split across the workers as they stream; a worker
    reads its shard with `cluster.data.shard_batches(name, ...)`. The split runs with each dataset's own execution
    options: a dataset made to keep its order (`cluster.data`) gives every worker the same rows on every pass and
    every restart (`_ordered_split`).

    The run's storage is `storage_path/name`. Ray Train V2 treats a snapshot found there as the same
    run and hands its newest checkpoint to the workers: with `resume` that is what is wanted (an error
    if there is none); otherwise an earlier run's storage under that name is removed first, so a run
    starts fresh unless asked to continue.
    """
    _prepare_storage(storage_path, name, resume)
    # The dashboard's Train API (`/api/train/v2/runs/v1`, read by `llmc status`) lists runs only with this.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # The controller polls its workers every 2 s by default, so a finished run waited up to 4 s more to end (a short
    # run took 13 s, 9 s with 0.5 s); the poll is one cheap call per worker.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(_HEALTH_CHECK_INTERVAL_S))
    reports = _report_queue(on_report)

    refs = {key: value if isinstance(value, PerRank) else (value if isinstance(value, Shared) else share(value)).ref
            for key, value in (shared or {}).items()}
    for key, value in refs.items():
        if isinstance(value, PerRank) and len(value.refs) != scaling.num_workers:
            raise ValueError(f"shared {key!r}: {len(value.refs)} shares for {scaling.num_workers} workers")
    loop = functools.partial(_run_with_shared, train_fn, refs) if refs else train_fn

    def trainer() -> _StoppableTrainer:
        return _StoppableTrainer(
            loop,
            train_loop_config={**config, **(prepare() if prepare else {})},
            datasets=datasets,
            dataset_config=_ordered_split(datasets),
            torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=scaling.num_workers,
                use_gpu=scaling.use_gpu,
                resources_per_worker=dict(scaling.resources_per_worker),
                accelerator_type=scaling.accelerator_type,
                placement_strategy=scaling.placement_strategy,
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage_path,
                # Restarts are ours (below): Ray Train would also retry an error no restart can fix.
                failure_config=FailureConfig(max_failures=0),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=keep_checkpoints,
                    checkpoint_score_attribute=keep_best_by[0] if keep_best_by else None,
                    checkpoint_score_order=keep_best_by[1] if keep_best_by else "max",
                ),
                callbacks=[*([_ForwardReports(reports)] if reports is not None else []), *callbacks] or None,
            ),
        )

    with _consume(reports, on_report):
        result = _fit_with_restarts(trainer, max_failures)
    checkpoint_dir = _local(result.checkpoint, local_copy_to)
    best_dir = None
    if keep_best_by and result.best_checkpoints:
        metric, order = keep_best_by
        pick = max if order == "max" else min
        best, _ = pick(result.best_checkpoints, key=lambda kept: kept[1][metric])
        best_dir = _local(best, local_copy_to and local_copy_to.with_name(f"{local_copy_to.name}_best"))
    return FitResult(checkpoint_dir, dict(result.metrics or {}), experiment_path(storage_path, name), best_dir)


def _ordered_split(datasets: dict[str, Any] | None) -> ray.train.DataConfig | None:
    """Ray Train splits a dataset with the driver's current Ray Data options, not the dataset's own: so a dataset
    that keeps its order (`preserve_order`) is split in order too, each block going to the worker with the fewest rows
    so far instead of to whichever asked first (or held it locally). What a worker streams is then the same on every
    pass and after a restart, which exact resume needs (`workloads.finetune.worker.StreamedSteps`)."""
    if not datasets:
        return None
    return ray.train.DataConfig(execution_options={name: ds.context.execution_options for name, ds in datasets.items()})


@dataclass(frozen=True)
class Shared:
    """A value in the cluster's object store (`share`), for `fit(shared=...)`: passed on without another copy."""

    ref: Any  # ray.ObjectRef


def share(value: Any) -> Shared:
    """Put `value` in the object store once; every run it is passed to (`fit(shared={key: it})`) reads that copy."""
    return Shared(ray.put(value))


@dataclass(frozen=True)
class PerRank:
    """One value per worker rank in the object store (`per_rank`), for `fit(shared=...)`: each worker reads its own."""

    refs: tuple  # ray.ObjectRef per rank


def per_rank(shares: Sequence[Any]) -> PerRank:
    """Each of `shares` put in the object store on its own: worker r of a run it is passed to reads only `shares[r]`
    (e.g. its shard of the training rows), so no worker holds the others'."""
    return PerRank(tuple(ray.put(value) for value in shares))


def _run_with_shared(train_fn: Callable[[dict], None], refs: dict[str, Any], config: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    train_fn({**config, **{key: ray.get(ref.refs[rank] if isinstance(ref, PerRank) else ref)
                           for key, ref in refs.items()}})


# Exceptions a train loop raises for what it was given (recipe, data, code): a restart would raise them again.
# So would running out of memory (`out_of_memory`) on the same resources. Other runtime errors (a collective whose
# peer died) and a dead worker process are retried.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, NameError, NotImplementedError,
                        AssertionError, ImportError, SyntaxError, ZeroDivisionError, FileNotFoundError,
                        NotADirectoryError, IsADirectoryError, PermissionError)
# Ray's errors that a restart cannot fix: the worker's environment cannot be built, or nothing can be placed.
_UNFIXABLE_RAY_ERRORS = (ray.exceptions.RuntimeEnvSetupError, ray.exceptions.ActorUnschedulableError,
                         ray.exceptions.TaskUnschedulableError)


class TrainingFailed(RuntimeError):
    """The run's workers failed: with an error no restart can fix, or more often than `max_failures` allows."""


def _fit_with_restarts(trainer: Callable[[], TorchTrainer], max_failures: int):
    """`trainer().fit()`, restarted from the run's newest checkpoint after a worker-group failure, up to
    `max_failures` times; an error every restart would hit again (`deterministic_failure`) is raised at once.

    A new trainer of the same name and storage continues the run: Ray Train V2 finds its snapshot and hands the
    newest checkpoint to the new workers, as its own restart would.
    """
    failures = 0
    while True:
        try:
            return trainer().fit()
        except WorkerGroupError as error:
            said = describe_failure(error)
            if (why := _why_not_retried(error)) is not None:
                raise TrainingFailed(f"{said}; not retried: {why}") from error
            if failures >= max_failures:
                raise TrainingFailed(f"{said}; {failures} restart(s) allowed (run.max_failures) were used") from error
            failures += 1
            print(f"[llmc] {said}; restart {failures} of {max_failures} from the newest checkpoint", flush=True)


def _why_not_retried(error: WorkerGroupError) -> str | None:
    """Why no restart can fix this failure, said to the user; None when a restart may."""
    if (cause := deterministic_failure(error)) is None:
        return None
    if out_of_memory(cause):
        return "out of memory, and a restart on the same resources runs out again (use smaller batches or sequences, " \
               "or more memory per worker)"
    return f"{type(cause).__name__} comes from the recipe, the data or the code, and a restart would raise it again"


def deterministic_failure(error: WorkerGroupError) -> BaseException | None:
    """The worker error that no restart can fix, if the failure is one: running out of memory on any worker, or an
    error `restart_fixes` says no restart fixes with no process lost (a dead worker's or role actor's callers and
    peers fail too, with runtime errors)."""
    failures = [_cause(f) for f in error.worker_failures.values()]
    if (oom := next((f for f in failures if out_of_memory(f)), None)) is not None:
        return oom
    if any(isinstance(f, ray.exceptions.RayError) and restart_fixes(f) for f in failures):
        return None
    return next((f for f in failures if not restart_fixes(f)), None)


def restart_fixes(failure: BaseException) -> bool:
    """Whether a restart can fix what a worker raised, by what it is: a lost process, node or object (a Train
    worker, or a role actor the restart replaces: `prepare`) and runtime errors can; an error of the recipe, data or
    code (`DETERMINISTIC_ERRORS`, also raised inside an actor's method), running out of memory (`out_of_memory`), an
    actor that failed in its constructor, a runtime environment that cannot be built or work that cannot be placed
    cannot."""
    failure = _cause(failure)
    if out_of_memory(failure):
        return False
    if isinstance(failure, ray.exceptions.RayActorError):
        return not failure.actor_init_failed
    if isinstance(failure, _UNFIXABLE_RAY_ERRORS):
        return False
    return isinstance(failure, ray.exceptions.RayError) or not isinstance(failure, DETERMINISTIC_ERRORS)


def _cause(failure: BaseException) -> BaseException:
    """What a worker's failure wraps: an actor method's own exception (RayTaskError), a failed health check's."""
    inner = getattr(failure, "cause", None) if isinstance(failure, ray.exceptions.RayTaskError) else \
        getattr(failure, "health_check_failure", None)
    return _cause(inner) if isinstance(inner, BaseException) else failure


def out_of_memory(failure: BaseException) -> bool:
    """A worker that ran out of memory: CUDA's (or another device's) allocator, the CPU allocator, Python's, or
    Ray's memory monitor killing the worker."""
    return (isinstance(failure, torch.OutOfMemoryError | MemoryError | ray.exceptions.OutOfMemoryError)
            or (isinstance(failure, RuntimeError) and _CPU_ALLOCATOR_FAILED in str(failure)))


_CPU_ALLOCATOR_FAILED = "DefaultCPUAllocator: can't allocate memory"  # torch's CPU allocator raises a RuntimeError


def describe_failure(error: WorkerGroupError) -> str:
    """One line: which ranks failed and with what (the first line of each distinct message)."""
    seen: dict[str, list[int]] = {}
    for rank, failure in sorted(error.worker_failures.items()):
        text = str(failure).strip().splitlines()
        seen.setdefault(f"{type(failure).__name__}: {text[0] if text else ''}"[:300], []).append(rank)
    return "worker group failed: " + "; ".join(f"rank {', '.join(map(str, ranks))}: {what}"
                                               for what, ranks in seen.items())


def _local(checkpoint, copy_to: Path | None) -> Path | None:
    """A checkpoint as a local directory: copied to `copy_to` if given, else its path when local storage."""
    if checkpoint is None:
        return None
    if copy_to is not None:
        return Path(checkpoint.to_directory(str(copy_to)))
    return Path(checkpoint.path) if "://" not in checkpoint.path else None


class _StoppableTrainer(TorchTrainer):
    """A TorchTrainer whose run is aborted when `fit` is interrupted (Ctrl-C, or SIGTERM: `cluster.runtime`
    turns it into the same KeyboardInterrupt), which then goes on to the caller.

    Ray Train's own Ctrl-C handler aborts the run too, but ends the driver with `sys.exit` inside `ray.get`,
    which Ray turns into exit status 1 with no message; so this keeps the controller (the hook below is
    where Ray Train hands it over) and aborts it itself. Abort ends the worker group and records the run as
    ABORTED; its checkpoints stay.
    """

    _controller = None

    def _register_sigint_handler(self, controller) -> None:  # Ray Train's hook, just before it waits on the run
        self._controller = controller

    def fit(self):
        try:
            return super().fit()
        except KeyboardInterrupt:
            self._abort()
            raise

    def _abort(self) -> None:
        if self._controller is None:
            return
        try:
            ray.get(self._controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
        except ray.exceptions.RayActorError:
            pass  # abort ends the controller's process: this is the normal outcome
        except ray.exceptions.GetTimeoutError:
            ray.kill(self._controller)


_ray_private.require_train_controller_hook(_StoppableTrainer)  # the hook it overrides is private to Ray Train


def experiment_path(storage_path: str, name: str) -> str:
    """Where Ray Train keeps run `name`'s checkpoints: `storage_path/name` (a local path or a URI)."""
    return f"{storage_path.rstrip('/')}/{name}"


def stored_entries(location: str) -> list[str]:
    """The names in `location` (an absolute local directory or an object-store URI; empty when there is none): a run's
    storage (`experiment_path`) holding any has an earlier run's checkpoints, which `fit` deletes unless it resumes."""
    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    return sorted(info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)))


def _prepare_storage(storage_path: str, name: str, resume: bool) -> None:
    fs, path = pyarrow.fs.FileSystem.from_uri(experiment_path(storage_path, name))
    snapshot = fs.get_file_info(f"{path}/{_SNAPSHOT}").type != pyarrow.fs.FileType.NotFound
    if resume and not snapshot:
        raise FileNotFoundError(f"no checkpoint of run {name!r} to resume in {experiment_path(storage_path, name)}")
    if not resume and fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


def run_url() -> str | None:
    """The dashboard page of the job driving this run (its workers, logs and metrics), if a dashboard runs."""
    from cluster.runtime import dashboard_url

    base = dashboard_url()
    return f"{base}/#/jobs/{ray.get_runtime_context().get_job_id()}" if base else None


class _ForwardReports(UserCallback):
    """Runs in the Train controller: puts rank 0's metrics of every report on the driver's queue."""

    def __init__(self, queue):
        self._queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics:
            self._queue.put(dict(metrics[0]))


def _report_queue(on_report: Callable[[dict], None] | None):
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0}) if on_report else None


@contextlib.contextmanager
def _consume(queue, on_report: Callable[[dict], None] | None) -> Iterator[None]:
    """Call `on_report` from a driver thread for every queued report while the block runs, then drain.

    `on_report` shows progress; the workers do not wait for it. So when it raises, the run goes on and every report
    still reaches it: the first failure is printed with its traceback, and their count when the block ends.
    """
    if queue is None:
        yield
        return
    from ray.util.queue import Empty

    done = threading.Event()
    failed = []  # the reports on_report raised on

    def pump() -> None:
        while True:
            try:
                row = queue.get(timeout=0.5)
            except Empty:
                if done.is_set():
                    return
                continue
            except Exception as error:  # noqa: BLE001 - the queue actor is gone: progress stops, training does not
                print(f"[llmc] progress reports stopped (their queue failed: {error!r}); training goes on",
                      file=sys.stderr, flush=True)
                return
            try:
                on_report(row)
            except Exception:  # noqa: BLE001 - a display failure must not end the run, nor pass unseen
                if not failed:
                    print(f"[llmc] the progress callback failed on a report; training goes on:\n"
                          f"{traceback.format_exc()}", file=sys.stderr, flush=True)
                failed.append(row)

    thread = threading.Thread(target=pump, name="llmc-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)
        queue.shutdown()
        if failed:
            print(f"[llmc] the progress callback failed on {len(failed)} report(s) (the first shown above)",
                  file=sys.stderr, flush=True)


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


def publish(values: dict) -> None:
    """Export this step's values (`metrics.TRAIN_GAUGES` keys; others and None skipped) as gauges
    `llmc_train_<key>{run=NAME}`, NAME being the run's name. Call it from one rank: the values are
    already reduced over workers.
    """
    tags = {metrics.RUN_TAG: ray.train.get_context().get_experiment_name()}
    for key, description in metrics.TRAIN_GAUGES.items():
        value = values.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.set_gauge(metrics.TRAIN_METRIC_PREFIX + key, value, tags, description)


@contextlib.contextmanager
def latest_checkpoint() -> Iterator[Path | None]:
    """The newest checkpoint of this run (after a restart) as a local directory, or None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as path:
        yield Path(path)
