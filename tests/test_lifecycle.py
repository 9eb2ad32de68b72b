"""Stopping cleanly: SIGTERM (what docker stop, systemd and Kubernetes send) ends `llmc serve` and
`llmc finetune` as Ctrl-C does: no traceback, and no process of the run left behind. The exit status says whether
the work finished: serving runs until stopped (0); an interrupted fine-tune exits 130 (SIGINT) or 143 (SIGTERM),
its last line naming the signal and where its checkpoints stay.

Each command runs on its own embedded Ray (RAY_ADDRESS removed), in a process session of its own, so
"nothing left" means: no process of that session (raylet, GCS, dashboard, agents, workers, engines).
Replica failures under load are in tests/test_serve.py (they reuse its server).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import METRICS_INTERVAL_ENV, REPO, session_processes
from tests.test_serve import random_adapter
from workloads.serve.deploy import ServeProcess

SERVE_RECIPE = REPO / "workloads/configs/serve-tiny.yaml"
FINETUNE_RECIPE = REPO / "workloads/configs/tiny-lora.yaml"
EXIT_TIMEOUT_S = 180  # the app is deleted, Ray shut down
LEFTOVER_TIMEOUT_S = 60  # after the exit, for the session to empty
UNCLEAN = ("Traceback", "SIGTERM received")


def test_a_process_that_ignores_sigterm_is_killed_once_shutdown_has_had_its_grace_period():
    """The safety net under `cluster.runtime.shutdown`: Ray's agents ignore SIGTERM."""
    import psutil

    from cluster.runtime import _reap

    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               "print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    stubborn.terminate()
    started = time.monotonic()
    _reap([psutil.Process(stubborn.pid)], grace_s=2)
    assert not psutil.pid_exists(stubborn.pid)  # killed and reaped (so Popen sees no status of its own)
    assert time.monotonic() - started >= 2  # it had its grace period first


def embedded_env() -> dict[str, str]:
    """This environment without RAY_ADDRESS: the command starts (and must stop) its own local Ray."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def leftovers(sid: int, timeout_s: float = LEFTOVER_TIMEOUT_S) -> list[tuple[int, str]]:
    """The processes of session `sid` still there after `timeout_s` (empty as soon as none are)."""
    deadline = time.monotonic() + timeout_s
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def kill_session(sid: int) -> None:
    for pid, _ in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_stopped_cleanly(returncode: int | None, output: str, sid: int, status: int = 0,
                           last_line: str = "[llmc] stopped") -> None:
    left = leftovers(sid)
    kill_session(sid)  # a failed run must not leave its processes to the rest of the suite
    tail = output[-6000:]
    assert returncode == status, f"exit status {returncode}, not {status}:\n{tail}"
    assert not [marker for marker in UNCLEAN if marker in output], tail
    assert last_line in output, tail
    assert not left, "left behind:\n" + "\n".join(f"{pid} {args[:160]}" for pid, args in left)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_entry_point_stopped_by_a_signal_exits_128_plus_it_saying_what_was_kept(sig, status):
    """The entry point itself, no Ray: the signal arrives while the command works; its note is the last line."""
    code = textwrap.dedent(f"""
        import os, time
        from workloads.common.entrypoint import run_entrypoint

        def command():
            try:
                os.kill(os.getpid(), {int(sig)})
                time.sleep(30)
            except KeyboardInterrupt as exc:
                exc.add_note("its checkpoints stay in /tmp/somewhere")
                raise
            return 0

        raise SystemExit(run_entrypoint(command))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"[llmc] interrupted by {sig.name} before it finished: its "
                                                     "checkpoints stay in /tmp/somewhere"), done.stderr


@pytest.mark.slow
def test_sigterm_stops_serve_deploying_on_embedded_ray_cleanly(tiny_model_dir, tmp_path):
    adapter = random_adapter(tiny_model_dir, tmp_path / "arith")  # the adapter path: local S3 endpoint included
    server = ServeProcess(SERVE_RECIPE, overrides=[f"adapters.paths.arith={adapter}"],
                          env={**embedded_env(), "LLMC_API_KEYS": ""})
    sid = server.proc.pid  # start_new_session: the session id is the driver's pid
    try:
        # Mid-deploy: the Serve controller, the ingress and the engine replica are starting (docker stop during a
        # slow start-up); the stop must clean up a half-started app as well as a running one.
        deadline = time.monotonic() + 600
        while not any("[llmc] deploying" in line for line in server.lines) and time.monotonic() < deadline:
            assert server.proc.poll() is None, "".join(server.lines)[-4000:]
            time.sleep(0.5)
        time.sleep(8)
        assert len(session_processes(sid)) > 5  # embedded Ray really runs in this session
        server.proc.send_signal(signal.SIGTERM)
        returncode = server.proc.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        if server.proc.poll() is None:
            kill_session(sid)
    output = "".join(server.lines)
    assert "[llmc] stopping ..." in output  # the app was deleted before Ray shut down
    assert_stopped_cleanly(returncode, output, sid)


def start_finetune(run_dir: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`llmc finetune` of the tiny LoRA recipe, long enough never to finish, in a process session of its own."""
    command = [sys.executable, "-m", "workloads.cli", "finetune", str(FINETUNE_RECIPE), "--output-dir", str(run_dir),
               "--set", "train.max_steps=100000", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=1000",
               "--set", "deepspeed.enabled=false"]  # DDP: the stop path is Ray Train's, DeepSpeed only adds start-up
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env={**embedded_env(), **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def sigterm_finetune(tiny_model_dir, tmp_path_factory) -> dict:
    """A fine-tune that never ends on its own: `llmc status` reads it on its embedded Ray's dashboard until it shows
    the run RUNNING with a step and loss, then, once a checkpoint holds that step, SIGTERM stops it. A run that cannot
    end before it is seen makes the status check hold on a machine of any speed (a 10-step run could finish first)."""
    from cluster.status import ClusterUnreachable, collect

    root = tmp_path_factory.mktemp("sigterm")
    run_dir, log = root / "run", root / "finetune.log"
    proc = start_finetune(run_dir, log, {METRICS_INTERVAL_ENV: "1000"})  # gauges every second
    sid, seen, history = proc.pid, None, []
    try:
        deadline = time.monotonic() + 600
        while seen is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"\[llmc\] run tiny-lora: dashboard (http\S+)/#/jobs/", log.read_text())
            try:
                runs = collect(found.group(1))["train_runs"] if found else []
            except (ClusterUnreachable, OSError):  # its dashboard still starting
                runs = []
            seen = next((r for r in runs if r["status"] == "RUNNING" and r.get("step", 0) >= 1), None)
            time.sleep(0.5)
        while seen is not None and time.monotonic() < deadline and proc.poll() is None:
            history = _checkpointed_history(run_dir)
            if len(history) >= seen["step"]:
                break
            time.sleep(0.5)
        running = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            kill_session(sid)
    return {"run_dir": run_dir, "output": log.read_text(), "sid": sid, "returncode": returncode, "seen": seen,
            "history": history, "running": running}


def _checkpointed_history(run_dir: Path) -> list[dict]:
    """The metrics rows in the run's newest complete checkpoint (empty while there is none)."""
    for state in sorted(run_dir.glob("checkpoints/tiny-lora/checkpoint_*/trainer_state.json"), reverse=True):
        try:
            return json.loads(state.read_text())["history"]
        except (OSError, ValueError):  # being written, or removed as an older checkpoint
            continue
    return []


@pytest.mark.slow
def test_llmc_status_shows_a_running_finetune_with_its_step_and_loss(sigterm_finetune):
    seen, history = sigterm_finetune["seen"], sigterm_finetune["history"]
    assert seen is not None, "never RUNNING with a step in llmc status:\n" + sigterm_finetune["output"][-6000:]
    assert seen["name"] == "tiny-lora" and seen["job_id"], seen
    assert len(history) >= seen["step"], (seen, len(history))
    assert seen["loss"] == pytest.approx(history[int(seen["step"]) - 1]["loss"], rel=1e-6), seen


@pytest.mark.slow
def test_sigterm_stops_finetune_mid_training_cleanly(sigterm_finetune):
    run_dir, output = sigterm_finetune["run_dir"], sigterm_finetune["output"]
    assert sigterm_finetune["running"] and sigterm_finetune["history"], output[-6000:]  # stopped mid-training
    assert not (run_dir / "summary.json").exists()  # stopped mid-run, not finished
    assert_stopped_cleanly(sigterm_finetune["returncode"], output, sigterm_finetune["sid"], status=143, last_line=(
        f"[llmc] interrupted by SIGTERM before it finished: training stopped; its checkpoints stay in "
        f"{run_dir / 'checkpoints' / 'tiny-lora'} (continue with --set run.resume_from=latest)"))


@pytest.mark.slow
def test_ctrl_c_stops_finetune_as_its_workers_start_cleanly(tiny_model_dir, tmp_path):
    """Ctrl-C as a terminal sends it (SIGINT to the whole foreground process group: driver and embedded Ray), early:
    while Ray Train starts the run, so this costs an embedded Ray's start and stop rather than a checkpoint."""
    run_dir = tmp_path / "run"
    log = tmp_path / "finetune.log"
    proc = start_finetune(run_dir, log)
    sid = proc.pid
    try:
        deadline = time.monotonic() + 600
        while "[llmc] run tiny-lora: dashboard" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-6000:]
            time.sleep(0.5)
        assert len(session_processes(sid)) > 5  # embedded Ray really runs in this session
        os.killpg(sid, signal.SIGINT)
        returncode = proc.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            kill_session(sid)
    assert_stopped_cleanly(returncode, log.read_text(), sid, status=130, last_line=(
        "[llmc] interrupted by SIGINT before it finished: training stopped; its checkpoints stay in"))
