"""`cluster.train.fit` restarts a failed worker group from its newest checkpoint, but not for an error that a
restart would only raise again. Real Ray Train runs of one worker on the session's cluster; the train loops are
plain functions that count their attempts in a file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ray.train import WorkerGroupError

from cluster import train as cluster_train

ONE_WORKER = cluster_train.WorkerScaling(num_workers=1, resources_per_worker={"CPU": 1})


def _attempt(config: dict) -> int:
    """Count this attempt in the run's file; returns its number (1 for the first)."""
    attempts = Path(config["attempts"])
    with attempts.open("a") as handle:
        handle.write("x")
    return len(attempts.read_text())


def bad_data_loop(config: dict) -> None:
    _attempt(config)
    raise ValueError("row 3 of train.jsonl has no 'output'")


def flaky_loop(config: dict) -> None:
    """Step 1 with a checkpoint, then the first attempt dies of a runtime error; a restart goes on from step 1."""
    attempt = _attempt(config)
    with cluster_train.latest_checkpoint() as checkpoint:
        step = json.loads((checkpoint / "state.json").read_text())["step"] if checkpoint else 0
    if step == 0:
        _checkpoint(config, {"step": 1, "attempt": attempt})
        step = 1
    if attempt == 1:
        raise RuntimeError("connection reset by peer")
    _checkpoint(config, {"step": step + 1, "attempt": attempt, "resumed_from": step})


def _checkpoint(config: dict, metrics: dict) -> None:
    saved = Path(config["attempts"]).with_name(f"ckpt-{metrics['step']}")
    saved.mkdir()
    (saved / "state.json").write_text(json.dumps({"step": metrics["step"]}))
    cluster_train.report(metrics, saved)


def _fit(loop, tmp_path: Path, max_failures: int) -> cluster_train.FitResult:
    import ray
    import ray.cloudpickle

    ray.init(ignore_reinit_error=True, log_to_driver=False)  # the session's cluster (RAY_ADDRESS)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    return cluster_train.fit(loop, {"attempts": str(tmp_path / "attempts")}, name=f"fail-{loop.__name__}",
                             storage_path=str(tmp_path / "storage"), scaling=ONE_WORKER, max_failures=max_failures)


@pytest.mark.slow
def test_an_error_no_restart_can_fix_is_not_retried(ray_cluster, tmp_path):
    with pytest.raises(cluster_train.TrainingFailed) as info:
        _fit(bad_data_loop, tmp_path, max_failures=2)
    said = str(info.value)
    assert "rank 0: ValueError: row 3 of train.jsonl has no 'output'" in said and "not retried" in said, said
    assert (tmp_path / "attempts").read_text() == "x"  # one attempt, not 1 + max_failures


@pytest.mark.slow
def test_a_runtime_failure_restarts_from_the_newest_checkpoint(ray_cluster, tmp_path, capsys):
    result = _fit(flaky_loop, tmp_path, max_failures=1)
    assert (tmp_path / "attempts").read_text() == "xx"
    assert result.metrics == {"step": 2, "attempt": 2, "resumed_from": 1}
    printed = capsys.readouterr().out
    assert "rank 0: RuntimeError: connection reset by peer; restart 1 of 1 from the newest checkpoint" in printed


def _worker_group_error(failure: BaseException) -> WorkerGroupError:
    return WorkerGroupError(f"{type(failure).__name__}: {failure}", {0: failure, 1: RuntimeError("peer died")})


def test_running_out_of_memory_is_not_retried():
    """A train loop's exception reaches the driver as itself (a real run raising this CPU OOM ended "rank 0:
    RuntimeError: [enforce fail at alloc_cpu.cpp...] DefaultCPUAllocator: can't allocate memory ...")."""
    import ray.exceptions
    import torch

    try:  # a real allocation failure of torch's CPU allocator (1 PiB)
        torch.empty(1 << 50, dtype=torch.uint8)
    except RuntimeError as error:
        cpu_oom = error
    failures = [cpu_oom, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError(),
                ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory")]
    for failure in failures:
        error = _worker_group_error(failure)
        assert cluster_train.deterministic_failure(error) is failure
        assert cluster_train._why_not_retried(error).startswith("out of memory, and a restart on the same resources")
    # The peer's error alone (a collective whose peer died) is still retried; bad data is not, for its own reason.
    assert cluster_train._why_not_retried(WorkerGroupError("x", {0: RuntimeError("peer died")})) is None
    assert cluster_train._why_not_retried(_worker_group_error(KeyError("output"))).startswith(
        "KeyError comes from the recipe")


@pytest.mark.slow
def test_a_failing_progress_callback_is_shown_and_the_reports_go_on(ray_cluster, capsys):
    import ray

    ray.init(ignore_reinit_error=True, log_to_driver=False)  # the session's cluster (RAY_ADDRESS)
    seen = []

    def on_report(row: dict) -> None:
        seen.append(row["step"])
        if row["step"] % 2 == 0:
            raise ValueError(f"the progress bar broke at step {row['step']}")

    queue = cluster_train._report_queue(on_report)
    with cluster_train._consume(queue, on_report):
        for step in range(1, 6):
            queue.put({"step": step})
    assert seen == [1, 2, 3, 4, 5]  # the reporting thread lived on
    err = capsys.readouterr().err
    assert "the progress callback failed on a report; training goes on" in err
    assert "ValueError: the progress bar broke at step 2" in err and "at step 4" not in err  # one traceback
    assert "the progress callback failed on 2 report(s)" in err


def test_what_a_restart_can_fix_is_told_by_the_error():
    """A lost process (a Train worker's, or a rollout engine's, which the restart replaces) is retried, with its
    callers' and peers' runtime errors; an actor's constructor failure, or a recipe/data error raised inside an actor's
    method, is not: a restart would meet it again. The errors are Ray's own, as a worker's `ray.get` raises them."""
    from ray.exceptions import ActorDiedError, RayTaskError, RuntimeEnvSetupError

    def in_actor(error: Exception, method: str) -> RayTaskError:
        return RayTaskError(f"RolloutEngine.{method}", f"Traceback: {error}", error).as_instanceof_cause()

    engine_lost = ActorDiedError()  # killed, or its process or node gone
    constructor_failed = ActorDiedError(RayTaskError("RolloutEngine.__init__", "Traceback", ValueError("no model"),
                                                     actor_id="0" * 32))
    bad_request = in_actor(ValueError("max_tokens must be at least 1"), "generate")
    peer_gone = RuntimeError("Connection closed by peer")
    assert cluster_train.restart_fixes(engine_lost) and cluster_train.restart_fixes(peer_gone)
    assert cluster_train.restart_fixes(in_actor(RuntimeError("CUDA error: an illegal memory access"), "generate"))
    assert not cluster_train.restart_fixes(constructor_failed) and not cluster_train.restart_fixes(bad_request)
    assert not cluster_train.restart_fixes(RuntimeEnvSetupError("pip install failed"))

    def group(*failures: Exception) -> WorkerGroupError:
        return WorkerGroupError("workers failed", dict(enumerate(failures)))

    assert cluster_train.deterministic_failure(group(engine_lost, peer_gone)) is None
    assert cluster_train.deterministic_failure(group(ValueError("row 3"), ActorDiedError())) is None  # a worker lost
    assert cluster_train.deterministic_failure(group(constructor_failed, peer_gone)) is constructor_failed
    unwrapped = cluster_train.deterministic_failure(group(peer_gone, bad_request))
    assert isinstance(unwrapped, ValueError) and str(unwrapped) == "max_tokens must be at least 1"
