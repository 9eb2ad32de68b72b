"""Connect to Ray: embedded local Ray by default, a running cluster with an address or RAY_ADDRESS.

Also how a driver stops: SIGTERM takes the Ctrl-C path (KeyboardInterrupt in the main thread, `cluster.stopping`)
again once `ray.init` has replaced the handler, and `shutdown` leaves no process of an embedded Ray behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

import psutil
import ray

from cluster import _ray_private
from cluster.stopping import on_sigterm, stop_on_sigterm

# Serve runs an ingress and one engine per replica beside training workers; on a 2-core laptop a logical CPU
# count of 8 (ray.init(num_cpus=8)) is what lets them share the machine.
DEFAULT_LOCAL_CPUS = 8
DEFAULT_OBJECT_STORE_BYTES = 1 << 30
# Driver-side loggers of Ray's libraries: per-request and per-deployment INFO lines, kept in log files.
_CHATTY_LOGGERS = ("ray", "ray.serve", "ray.train", "ray.tune", "ray.data", "vllm", "deepspeed", "httpx")
_session: dict[str, str] = {}  # what ray.init returned: dashboard URL, session dir


def verbose() -> bool:
    """Whether Ray, Serve and vLLM chatter reaches the terminal: `--verbose` or LLMC_LOG_LEVEL=debug."""
    return os.environ.get("LLMC_LOG_LEVEL", "").strip().lower() in ("debug", "verbose")


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Initialize Ray once per process and return a one-line description of where it runs.

    By default worker and actor output stays in Ray's session logs (see `log_dir`); verbose streams it here.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    loud = verbose()
    if not ray.is_initialized():
        options = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}
        if address:
            context = _init(address=address, **options)
        else:
            _embedded.set()  # before init: processes of an interrupted init are stopped by `shutdown` too
            _interpreter_tools_first()
            context = _init(
                num_cpus=num_cpus or max(os.cpu_count() or 1, DEFAULT_LOCAL_CPUS),
                object_store_memory=DEFAULT_OBJECT_STORE_BYTES,
                **options,
            )
        stop_on_sigterm()  # after ray.init, which installs its own
        _session.update(dashboard=context.dashboard_url or "", session_dir=context.address_info.get("session_dir", ""))
    if not loud:
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        # On 2 cores the raylet warns on every run that it started "N PYTHON worker processes" (Train workers,
        # engines and Ray Data tasks start at once); a note for Ray's logs, not the terminal.
        _ray_private.drop_driver_messages(_worker_pool_note)
    ctx = ray.get_runtime_context()
    dashboard = dashboard_url()
    where = f"Ray cluster at {address}" if address else "embedded local Ray"
    resources = ray.cluster_resources()
    return (
        f"{where} (node {ctx.get_node_id()[:8]}, {resources.get('CPU', 0):g} CPUs, "
        f"{resources.get('GPU', 0):g} GPUs{', dashboard ' + dashboard if dashboard else ''})"
    )


def _worker_pool_note(line: str) -> bool:
    return "PYTHON worker processes have been started" in line


def node_ips() -> tuple[str, list[str]]:
    """(IP of the node this driver runs on, IPs of every alive node of the connected cluster), once connected.

    Raylets at one IP are one machine; a node at another IP is, as far as a driver can tell, another machine:
    it shares neither this one's loopback nor, unless mounted there, its files. Only nodes alive now are seen.
    """
    mine, alive = _nodes()
    return mine, sorted({n["NodeManagerAddress"] for n in alive})


def missing_on_other_machines(paths: list[str], timeout_s: float = 60) -> dict[str, list[str]]:
    """Which of `paths` the nodes at another IP than this driver's do not see: {node IP: [path, ...]}, for the
    nodes that lack any. A zero-CPU task pinned to each such node looks; a node that has not answered within
    `timeout_s` (its workers still starting) or could not run it is left out rather than blamed."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def missing(paths: list[str]) -> list[str]:  # nested: shipped by value, so a node needs none of our modules
        return [path for path in paths if not os.path.exists(path)]

    mine, alive = _nodes()
    probe = ray.remote(num_cpus=0, max_retries=0)(missing)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths):
            n["NodeManagerAddress"] for n in alive if n["NodeManagerAddress"] != mine}
    if not refs:
        return {}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in late:
        ray.cancel(ref, force=True)
    found: dict[str, set[str]] = {}
    for ref in ready:
        with contextlib.suppress(ray.exceptions.RayError):
            found.setdefault(refs[ref], set()).update(ray.get(ref))
    return {ip: sorted(lacking) for ip, lacking in found.items() if lacking}


def _nodes() -> tuple[str, list[dict]]:
    """(this driver's node IP, the alive nodes as `ray.nodes()` lists them)."""
    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return next((n["NodeManagerAddress"] for n in alive if n["NodeID"] == here), ""), alive


def _interpreter_tools_first() -> None:
    """Put this interpreter's bin directory first on PATH, for the workers an embedded Ray starts with our env.

    DeepSpeed builds its CPU ops with the `ninja` on PATH; a venv's ninja and the system's hash build commands
    differently, so every switch between them rebuilt the op (~30 s on 2 cores), and without a system ninja
    the build failed.
    """
    tools = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != tools:
        os.environ["PATH"] = os.pathsep.join([tools, os.environ.get("PATH", "")])


def dashboard_url() -> str:
    """The dashboard of the connected cluster as an http URL, or '' when it runs without one."""
    url = _session.get("dashboard", "")
    return url if not url or url.startswith("http") else f"http://{url}"


def log_dir() -> str | None:
    """Ray's session log directory on this machine (every worker's and actor's output), once connected."""
    session = _session.get("session_dir")
    return os.path.join(session, "logs") if session else None


def shutdown() -> None:
    """Disconnect from Ray. An embedded Ray is shut down, and whatever it started that still runs a few
    seconds later is killed: Ray's agents ignore SIGTERM and outlived drivers that did not shut down."""
    if not (ray.is_initialized() or _embedded.is_set()):
        return
    started = _embedded_processes() if _embedded.is_set() else []
    ray.shutdown()
    _embedded.clear()
    _reap(started)


# ---------------------------------------------------------------------------------------------
# Stopping: SIGTERM is Ctrl-C, and embedded Ray leaves nothing behind
# ---------------------------------------------------------------------------------------------

_embedded = threading.Event()  # set while this process runs its own local Ray
REAP_GRACE_S = 5.0  # how long Ray's own shutdown gets before what it started is killed


def _init(**options):
    """`ray.init`; a SIGTERM while it runs takes the Ctrl-C path too (Ray's init-time handler calls sys.exit(15))."""
    try:
        return ray.init(**options)
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:
            on_sigterm()  # raises KeyboardInterrupt, the stop recorded as SIGTERM's
        raise


def _embedded_processes() -> list[psutil.Process]:
    """What the local Ray of this driver runs: its descendants (GCS, raylet, dashboard, agents, workers
    and their children), plus workers' children that outlived their parent (they carry the raylet's pid)."""
    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    raylets = {str(p.pid) for p in found.values() if _name(p) == "raylet"}
    if raylets:
        for p in psutil.process_iter():
            if p.pid not in found and p.pid != me.pid and _environ(p).get("RAY_RAYLET_PID") in raylets:
                found[p.pid] = p
    return list(found.values())


def _reap(processes: list[psutil.Process], grace_s: float = REAP_GRACE_S) -> None:
    """Give Ray's shutdown `grace_s` to end `processes`, then SIGKILL what is left (psutil skips reused pids)."""
    deadline = time.monotonic() + grace_s
    alive = processes
    while alive and time.monotonic() < deadline:
        _, alive = psutil.wait_procs(alive, timeout=0.5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _environ(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except psutil.Error:
        return {}
