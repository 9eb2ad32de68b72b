"""Submit a workload to a running Ray cluster through the job submission API (dashboard REST)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.auth import auth_token

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
# Uploading these would waste the size limit on the working dir (and leak local state).
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "runs/", "bench/results/", "**/__pycache__/", ".pytest_cache/"]
POLL_S = 1.0
STOP_TIMEOUT_S = 60.0  # for a stopped job to end: Ray sends SIGTERM, then SIGKILL after its own grace period


def auth_headers() -> dict[str, str]:
    """The dashboard's REST API answers 401 without the cluster token (Ray 2.60 default)."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_address(address: str | None) -> str:
    """The dashboard URL from --address, RAY_DASHBOARD_ADDRESS or RAY_ADDRESS (if it is http)."""
    for candidate in (address, os.environ.get("RAY_DASHBOARD_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
    return DEFAULT_DASHBOARD


def submit(
    entrypoint: str,
    address: str | None = None,
    working_dir: str | Path = ".",
    env_vars: dict[str, str] | None = None,
    excludes: list[str] = (),
    wait: bool = True,
    timeout_s: float | None = None,
    stop_on_interrupt: bool = False,
) -> tuple[str, str, str]:
    """Submit `entrypoint` with `working_dir` uploaded but `excludes`; returns (job id, final or current status, URL).

    `env_vars` reach the job's processes through its runtime environment; their values are never printed. With
    `wait`, the job's log is followed as it is written until the job ends (or `timeout_s` passes: then it is
    stopped). Ctrl-C while following leaves the job running, or stops it with `stop_on_interrupt`; either way the
    KeyboardInterrupt goes on to the caller with a note saying which, and how to follow or stop the job.
    """
    url = dashboard_address(address)
    client = JobSubmissionClient(url, headers=auth_headers())
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES + list(excludes),
                     "env_vars": env_vars or {}},
    )
    print(f"[llmc] submitted {job_id} to {url}; dashboard: {url}/#/jobs/{job_id}", flush=True)
    if not wait:
        return job_id, client.get_job_status(job_id).value, url
    try:
        followed = asyncio.run(asyncio.wait_for(_follow(client, job_id), timeout_s))
    except TimeoutError:
        client.stop_job(job_id)
        return job_id, "TIMEOUT", url
    except KeyboardInterrupt as exc:
        exc.add_note(_on_interrupt(client, job_id, url, stop_on_interrupt))
        raise
    return job_id, followed.value, url


async def _follow(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """Print the job's log as it is written (streamed from the dashboard, each line once) until the job ends."""
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)
    while not (status := client.get_job_status(job_id)).is_terminal():  # the stream ended early (dashboard restart)
        await asyncio.sleep(POLL_S)
    return status


def _on_interrupt(client: JobSubmissionClient, job_id: str, url: str, stop: bool) -> str:
    """Stop the job (`stop`) or leave it running; the sentence that says which, and what to run next."""
    ray_job = f"RAY_AUTH_MODE=token ray job {{}} --address {url} {job_id}"
    if not stop:
        return (f"job {job_id} goes on on the cluster: follow it with `{ray_job.format('logs --follow')}`, stop it "
                f"with `{ray_job.format('stop')}` (or pass --stop-on-interrupt next time)")
    client.stop_job(job_id)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return f"job {job_id} stopped on the cluster ({status.value})"
