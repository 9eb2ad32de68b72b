"""Submit a workload to a running Ray cluster through the job submission API (dashboard REST)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.auth import auth_token

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
# Uploading these would waste the size limit on the working dir (and leak local state).
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "runs/", "bench/results/", "**/__pycache__/", ".pytest_cache/"]


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
) -> tuple[str, str, str]:
    """Submit `entrypoint` with `working_dir` uploaded but `excludes`; returns (job id, final or current status, URL).

    `env_vars` reach the job's processes through its runtime environment; their values are never printed.
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
    deadline = time.monotonic() + timeout_s if timeout_s else None
    seen = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[seen:], end="", flush=True)
        seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return job_id, status.value, url
        if deadline and time.monotonic() > deadline:
            client.stop_job(job_id)
            return job_id, "TIMEOUT", url
        time.sleep(2)
