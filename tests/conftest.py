"""Session fixtures: one tiny model and one real Ray cluster (`ray start --head`) for the whole run.

Every end-to-end test talks to that cluster: subprocesses through RAY_ADDRESS, this process through
`ray.init(address=...)`. The cluster runs in its own process session, so teardown stops exactly it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from workloads.objectstore import free_port

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# One cache per machine: the tiny model is built once and reused by every later session.
os.environ.setdefault("LLMC_CACHE", str(Path.home() / ".cache" / "llmcluster"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The session's `ray start` head enforces token auth (Ray 2.60 default); this process and every
# subprocess driver must send the token, and Ray reads this once, when it is first imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@dataclass(frozen=True)
class RayCluster:
    address: str  # GCS address for ray.init / RAY_ADDRESS
    dashboard_url: str  # job submission API
    metrics_url: str  # the head node's Prometheus export (ray_* series, ours included)
    temp_dir: str
    sid: int  # the cluster's process session: its raylet, GCS and every worker (each in its own group)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from workloads.config import TinyModelConfig
    from workloads.models import build_tiny_model

    return build_tiny_model(TinyModelConfig())


@pytest.fixture(scope="session")
def ray_cluster(tiny_model_dir) -> RayCluster:
    """A local head node with 8 logical CPUs (training workers, Serve ingress and engines share it).

    On a machine that never ran Ray there is no token yet and `ray start --head` would exit 1: create it first.
    """
    from cluster.auth import ensure_auth_token

    ensure_auth_token()
    port, dash_port, metrics_port, agent_port = free_port(), free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    ray_bin = Path(sys.executable).with_name("ray")
    log = Path(temp_dir) / "ray-start.log"
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--metrics-export-port={metrics_port}",
         # The job agent's default port (52365) is taken by any other Ray on the machine: then jobs get
         # "No available agent to submit job".
         f"--dashboard-agent-listen-port={agent_port}",
         "--num-cpus=8", "--object-store-memory=1000000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
        # Jobs run `python -m workloads.cli`: this venv's python must come first on the cluster's PATH.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"},
    )
    cluster = RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash_port}",
                         f"http://127.0.0.1:{metrics_port}/metrics", temp_dir, proc.pid)
    _wait_for_dashboard(cluster.dashboard_url, proc, log)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    yield cluster
    import ray

    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None) if previous is None else os.environ.update(RAY_ADDRESS=previous)
    _stop_session(proc)


def _wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 (loopback)
            return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP answer (e.g. 401) means it is up
                return
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {url} did not come up in {timeout}s")


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process in session `sid`."""
    listing = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in listing.splitlines()]
    return [(int(r[0]), r[2] if len(r) > 2 else "") for r in rows if len(r) > 1 and int(r[1]) == sid]


def _stop_session(proc: subprocess.Popen) -> None:
    """`ray start --block` stops its cluster on SIGTERM; then kill whatever of its session is left."""
    proc.terminate()
    try:
        proc.wait(timeout=8)  # it often lingers well past its cluster; the kill below ends the rest
    except subprocess.TimeoutExpired:
        pass
    for pid, _ in session_processes(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_llmc(*args: str, timeout: float = 900, env: dict | None = None,
             cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the real `llmc` entry point in a subprocess; output captured for assertions."""
    return subprocess.run(
        [sys.executable, "-m", "workloads.cli", *args],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`-m "not slow"` stays fast: every test on the session's Ray cluster (Serve, vLLM, Train) is slow."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
