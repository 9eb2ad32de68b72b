"""`llmc submit` against the session's real `ray start --head` cluster: the job API, the uploaded working dir."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

import pytest

from tests.conftest import REPO, WATCHED_STEPS, run_llmc

pytestmark = pytest.mark.slow


def test_submit_runs_a_tiny_finetune_job_to_completion(watched_finetune, ray_cluster):
    """The shared watched run (tests/conftest.py) is a `llmc submit` of a fine-tune: its output and results."""
    output = watched_finetune["output"]
    assert "SUCCEEDED" in output and f"{ray_cluster.dashboard_url}/#/jobs/" in output
    # the job's own log (progress, summary) was followed
    assert f"{WATCHED_STEPS}/{WATCHED_STEPS}" in output and "fine-tuning summary" in output
    summary = watched_finetune["summary"]  # same machine: the job wrote where it was told
    assert summary["steps"] == WATCHED_STEPS and summary["method"] == "lora" and summary["workers"] == 2


def test_submit_rejects_a_bad_recipe_before_contacting_the_cluster(tmp_path):
    result = run_llmc("submit", "--address", "http://127.0.0.1:9", "--",
                      "finetune", "workloads/configs/tiny-lora.yaml", "--set", "train.method=sft")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "train.method" in result.stderr and "lora" in result.stderr
    assert "submitted" not in result.stdout


def test_submit_refuses_inline_keys_and_holds_back_secrets(ray_cluster, tmp_path):
    """No `.env` file, no recipe with inline keys reaches the cluster; a named variable does, its value unprinted."""
    import shutil

    from tests.conftest import REPO

    work = tmp_path / "work"
    shutil.copytree(REPO / "workloads", work / "workloads", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "cluster", work / "cluster", ignore=shutil.ignore_patterns("__pycache__"))
    (work / ".env").write_text("HF_TOKEN=do-not-upload\n")
    keyed = work / "workloads/configs/serve-keyed.yaml"
    keyed.write_text((REPO / "workloads/configs/serve-tiny.yaml").read_text().replace(
        "server:", "server:\n  api_keys: [inline-secret-key-0123456789abcdef]", 1))
    refused = run_llmc("submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(work), "--",
                       "serve", str(keyed))
    assert refused.returncode == 2 and "field 'server.api_keys'" in refused.stderr, refused.stderr
    # A job that lists what it received: the working dir it sees, and the forwarded variable.
    probe = work / "workloads/configs/tiny-probe.yaml"
    probe.write_text((REPO / "workloads/configs/tiny-lora.yaml").read_text())
    secret = "hf_" + "x" * 30
    result = run_llmc("submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(work), "--env",
                      "HF_TOKEN", "--", "validate", "workloads/configs/tiny-probe.yaml", env={"HF_TOKEN": secret},
                      cwd=work)  # the recipe path is the same locally (checked first) and in the uploaded dir
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "SUCCEEDED" in output, output[-3000:]
    assert "not uploaded (API keys inline): workloads/configs/serve-keyed.yaml" in output
    assert "forwarding environment variables: HF_TOKEN (values not shown)" in output and secret not in output
    uploaded, env_vars = _job_package_and_env(ray_cluster, output)
    assert any(n.endswith("workloads/configs/tiny-probe.yaml") for n in uploaded), uploaded  # it was uploaded
    assert not any(n.endswith((".env", "serve-keyed.yaml")) for n in uploaded), uploaded
    assert env_vars.get("HF_TOKEN") == secret
    missing = run_llmc("submit", "--address", ray_cluster.dashboard_url, "--env", "LLMC_NOT_SET_ANYWHERE", "--",
                       "validate", "workloads/configs/tiny-lora.yaml")
    assert missing.returncode == 2 and "LLMC_NOT_SET_ANYWHERE not set" in missing.stderr


def _job_package_and_env(ray_cluster, output: str) -> tuple[list[str], dict]:
    """The files of the working dir the cluster stored for the job, and the job's environment variables."""
    import io
    import re
    import zipfile

    import ray
    from ray.experimental.internal_kv import _internal_kv_get  # the cluster's own copy of the package
    from ray.job_submission import JobSubmissionClient

    from cluster.jobs import auth_headers

    job_id = re.search(r"job (\S+): SUCCEEDED", output).group(1)
    info = JobSubmissionClient(ray_cluster.dashboard_url, headers=auth_headers()).get_job_info(job_id)
    ray.init(address=ray_cluster.address, ignore_reinit_error=True, log_to_driver=False)
    package = _internal_kv_get(info.runtime_env["working_dir"])
    names = zipfile.ZipFile(io.BytesIO(package)).namelist()
    return names, info.runtime_env.get("env_vars", {})


FOLLOWED_JOB = '''
import time

print("follow-me 1", flush=True)
time.sleep(1)
print("follow-me 2", flush=True)
time.sleep(600)
'''


def test_ctrl_c_on_a_followed_job_leaves_it_running_or_stops_it(ray_cluster, tmp_path):
    """The job's log streams while it runs; Ctrl-C stops following (exit 130) and says the job goes on, and how to
    follow or stop it (the stock commands printed are run here); with --stop-on-interrupt the job is stopped. The
    job is a stand-in `workloads/cli.py` in the uploaded working dir: what is tested is the local side."""
    import shlex

    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.jobs import auth_headers

    work = tmp_path / "work"
    (work / "workloads").mkdir(parents=True)
    (work / "workloads/__init__.py").write_text("")
    (work / "workloads/cli.py").write_text(FOLLOWED_JOB)
    client = JobSubmissionClient(ray_cluster.dashboard_url, headers=auth_headers())

    def follow_then_interrupt(*flags: str) -> tuple[str, str, str]:
        proc = subprocess.Popen([sys.executable, "-m", "workloads.cli", "submit", "--address",
                                 ray_cluster.dashboard_url, "--working-dir", str(work), *flags, "--", "status"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        watchdog = threading.Timer(300, proc.kill)  # a job that never prints must not hang the suite
        watchdog.start()
        try:
            for line in proc.stdout:  # streamed while the job runs: its second line comes a second after its first
                seen.append(line)
                if line.startswith("follow-me 2"):
                    break
            proc.send_signal(signal.SIGINT)
            rest, err = proc.communicate(timeout=120)
        finally:
            watchdog.cancel()
            proc.kill()
        output = "".join(seen) + rest
        assert proc.returncode == 130, output + err
        assert output.count("follow-me 1") == 1 and output.count("follow-me 2") == 1, output
        job_id = re.search(r"submitted (\S+) to", output).group(1)
        return job_id, output, err.strip().splitlines()[-1]

    job_id, _, last = follow_then_interrupt()
    follow, stop = re.findall(r"`([^`]+)`", last)[:2]  # `VAR=value ray job ...`, run through `env`
    assert last.startswith(f"[llmc] interrupted by SIGINT before it finished: job {job_id} goes on on the "
                           "cluster"), last
    assert client.get_job_status(job_id) == JobStatus.RUNNING
    logs = subprocess.run(["env", *shlex.split(follow.replace(" --follow", ""))], capture_output=True, text=True,
                          timeout=120)  # (following would wait for the job's end)
    assert "follow-me 2" in logs.stdout, logs.stdout + logs.stderr
    subprocess.run(["env", *shlex.split(stop)], capture_output=True, timeout=120, check=True)
    assert client.get_job_status(job_id) == JobStatus.STOPPED

    job_id, _, last = follow_then_interrupt("--stop-on-interrupt")
    assert last == f"[llmc] interrupted by SIGINT before it finished: job {job_id} stopped on the cluster (STOPPED)"
    assert client.get_job_status(job_id) == JobStatus.STOPPED
