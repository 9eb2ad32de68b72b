"""Session fixtures: one tiny model and one real Ray cluster (`ray start --head`) for the whole run.

Every end-to-end test talks to that cluster: subprocesses through RAY_ADDRESS, this process through
`ray.init(address=...)`. The cluster runs in its own process session, so teardown stops exactly it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from workloads.serve.deploy import ServeProcess
from workloads.serve.objectstore import free_port

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# One cache per machine: the tiny model is built once and reused by every later session.
os.environ.setdefault("LLMC_CACHE", str(Path.home() / ".cache" / "llmcluster"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The session's `ray start` head enforces token auth (Ray 2.60 default); this process and every
# subprocess driver must send the token, and Ray reads this once, when it is first imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# No MLflow run per command (3-8 s each: importing MLflow, opening or creating its database): tests/test_record.py
# and the `lora_run` it reads turn it on (LLMC_MLFLOW=on).
os.environ.setdefault("LLMC_MLFLOW", "off")
# This venv's tools first for every process the suite starts (as `llmc` does for an embedded Ray): DeepSpeed
# builds its CPU ops with the `ninja` on PATH, and a second ninja would rebuild them (cluster/runtime.py).
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def pytest_configure() -> None:
    """Torch work in this process (small models, a few batches) runs on one thread: with two threads on 2 cores, a
    core kept busy by Ray, vLLM or training processes makes every parallel region wait for the descheduled thread
    (the greedy-generation test took 30 s at the end of the suite, 3 s on its own).

    SIGINT is handled as Python does by default even when the suite was started in the background (`nohup`, `&`):
    there it arrives ignored, every command the tests start would inherit that, and Ctrl-C tests would see nothing.
    """
    import torch

    torch.set_num_threads(1)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass(frozen=True)
class RayCluster:
    address: str  # GCS address for ray.init / RAY_ADDRESS
    dashboard_url: str  # job submission API
    metrics_url: str  # the head node's Prometheus export (ray_* series, ours included)
    temp_dir: str
    sid: int  # the cluster's process session: its raylet, GCS and every worker (each in its own group)


_BUILD_LOG = Path(tempfile.gettempdir()) / f"llmc-tiny-build-{os.getpid()}.log"
_model_build: subprocess.Popen | None = None  # the tiny model building in the background, if it was not cached
_ray_head: tuple[subprocess.Popen, RayCluster, Path] | None = None  # started early, not yet handed out
_wants_cluster = False  # some collected test uses the session's Ray cluster


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The pretrained tiny model; waits for the background build that collection started, if any."""
    from workloads.models.recipe import TinyModelConfig
    from workloads.models.tiny import build_tiny_model

    if _model_build is not None and _model_build.poll() is None and _ray_head is None and _wants_cluster:
        _start_ray_head()  # the tests that need no model are done: the other core starts the cluster meanwhile
        _start_op_build()
    if _model_build is not None and _model_build.wait() != 0:
        pytest.fail(f"building the tiny model failed (exit {_model_build.returncode}):\n"
                    f"{_BUILD_LOG.read_text()[-5000:]}")
    return build_tiny_model(TinyModelConfig())


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF in its PyPI wheel (about 30 s the first time on a machine)."""
    from workloads.models.loading import resolve_model_path
    from workloads.models.recipe import ModelConfig

    return Path(resolve_model_path(ModelConfig(name="smollm2-135m")))


@pytest.fixture(scope="session")
def ray_cluster(tiny_model_dir) -> RayCluster:
    """A local head node with 8 logical CPUs (training workers, Serve ingress and engines share it).

    Started (`_start_ray_head`) while the tiny model builds, if it was not cached; this waits for its dashboard.
    """
    global _ray_head
    if _ray_head is None:
        _start_ray_head()
    (proc, cluster, log), _ray_head = _ray_head, None
    _wait_for_dashboard(cluster.dashboard_url, proc, log)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    yield cluster
    import ray

    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None) if previous is None else os.environ.update(RAY_ADDRESS=previous)
    _stop_session(proc)


def _start_ray_head() -> None:
    """`ray start --head` in a process session of its own. On a machine that never ran Ray there is no token
    yet and it would exit 1: the token is created first."""
    global _ray_head
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
        env=os.environ.copy(),  # this venv first on PATH: jobs run `python -m workloads.cli`
    )
    _ray_head = (proc, RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash_port}",
                                  f"http://127.0.0.1:{metrics_port}/metrics", temp_dir, proc.pid), log)


WATCHED_STEPS = 10
METRICS_INTERVAL_ENV = "RAY_metrics_report_interval_ms"  # how often Ray processes export metrics


@pytest.fixture(scope="session")
def watched_finetune(ray_cluster, tmp_path_factory) -> dict:
    """One small DDP fine-tune (2 workers, 10 steps, a checkpoint every 5), submitted with `llmc submit` and
    watched while it runs: its node metrics export and `llmc status`'s jobs are read during the run (gauges vanish
    ~15 s after the worker that set them exits; `llmc status` of a running train run is read in test_lifecycle.py,
    on a run that cannot end before it is seen). Shared by the submit, monitoring and resume tests, so the
    suite pays for one Ray Train run instead of three; a test that changes the run copies it first.
    """
    from cluster.metrics import TRAIN_GAUGES, TRAIN_METRIC_PREFIX, exported_name, scrape
    from cluster.status import collect

    root = tmp_path_factory.mktemp("watched")
    out, name = root / "run", f"mon-{os.getpid()}"
    # The job's processes export their metrics four times a second, not every 10 s: the run lasts seconds. (Only the
    # job's: the cluster's own gauges, refreshed less often, would vanish between refreshes.)
    command = ["submit", "--address", ray_cluster.dashboard_url, "--env", METRICS_INTERVAL_ENV, "--", "finetune",
               "workloads/configs/tiny-lora.yaml", "--output-dir", str(out)]
    for override in (f"run.name={name}", f"train.max_steps={WATCHED_STEPS}", "train.eval_every=5",
                     "train.checkpoint_every=5", "train.log_every=1", "deepspeed.enabled=false"):
        command += ["--set", override]
    wanted = {exported_name(TRAIN_METRIC_PREFIX + key): key for key in TRAIN_GAUGES}
    log = root / "submit.log"  # a file, not a pipe: nobody reads a pipe while this loop polls
    proc = subprocess.Popen([sys.executable, "-m", "workloads.cli", *command], cwd=REPO, text=True,
                            env={**os.environ, METRICS_INTERVAL_ENV: "250"}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    last, status, ended, job_id = {}, None, None, None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            samples = scrape(ray_cluster.metrics_url)
        except OSError:  # the node's metrics agent starts a little after the dashboard
            samples = []
        values = {wanted[n]: v for n, labels, v in samples if n in wanted and labels.get("run") == name}
        last = values or last
        if job_id is None and (submitted := re.search(r"submitted (\S+) to", log.read_text())):
            job_id = submitted.group(1)
        if job_id and proc.poll() is None and not _job_running(status, job_id):
            status = collect(ray_cluster.dashboard_url)  # until it shows the job RUNNING (from its start to its end)
        if proc.poll() is not None:
            ended = ended or time.monotonic()
            if last.get("step") == WATCHED_STEPS or time.monotonic() - ended > 30:
                break
        time.sleep(0.25)
    proc.wait(timeout=60)
    output = log.read_text()
    assert proc.returncode == 0, output[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    checkpoint = root / "final-checkpoint"  # kept apart: tests that rerun into `out` replace its checkpoints
    shutil.copytree(summary["checkpoint"], checkpoint)
    storage = {run.name: [json.loads((c / "trainer_state.json").read_text())["step"]  # each kept checkpoint's step
                          for c in sorted(run.glob("checkpoint_*")) if c.is_dir()]
               for run in (out / "checkpoints").iterdir()}
    return {"out": out, "name": name, "output": output, "summary": summary, "rows": read_metrics_csv(out),
            "storage": storage, "checkpoint": checkpoint,  # a copy of the final checkpoint
            "last": last, "status_jobs": (status or {}).get("jobs", [])}


def _job_running(status: dict | None, job_id: str) -> bool:
    return any(j["id"] == job_id and j["status"] == "RUNNING" for j in (status or {}).get("jobs", []))


LORA_STEPS = 30


@pytest.fixture(scope="session")
def lora_run(ray_cluster, tmp_path_factory) -> dict:
    """The bundled LoRA recipe on 2 workers with ZeRO-2 and 8-bit AdamW, 30 steps, a checkpoint every 5; one worker
    is SIGKILLed once Ray has registered a checkpoint, so the run restarts from it. Its adapter is the one the test
    server serves as `tiny:arith` (a trained adapter: prompt evaluations see it beat the base). Recorded in MLflow
    (the SQLite store beside it, `out.parent`/mlflow.db): tests/test_record.py reads that run."""
    out = tmp_path_factory.mktemp("lora") / "run"
    args = ["finetune", "workloads/configs/tiny-lora.yaml", "--output-dir", str(out)]
    # Batches of 64: steps slow enough (~0.2 s) that the kill lands well before the last one.
    for override in ("run.merge_adapter=true", f"train.max_steps={LORA_STEPS}", "train.eval_every=10",
                     "train.checkpoint_every=5", "train.optimizer=adamw_8bit", "train.micro_batch_size=64"):
        args += ["--set", override]
    proc = subprocess.Popen([sys.executable, "-m", "workloads.cli", *args], cwd=REPO,
                            env={**os.environ, "LLMC_MLFLOW": "on", "MLFLOW_TRACKING_URI": ""},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    snapshot = out / "checkpoints" / "tiny-lora" / "checkpoint_manager_snapshot.json"
    deadline, killed = time.monotonic() + 600, None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        # Ray Train writes this file once its controller has registered a checkpoint: a restart resumes from it.
        if _registered_checkpoint(snapshot):
            workers = [pid for pid, cmd in session_processes(ray_cluster.sid) if cmd.startswith("ray::RayTrainWorker")]
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    printed, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, printed[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "steps": LORA_STEPS, "printed": printed, "killed": killed, "summary": summary,
            "adapter": Path(summary["artifact"])}


# Run in a process of its own (this one keeps no Ray connection): as soon as the run writes its first checkpoint (its
# hidden partial directory appears: the engine is not called again before the next iteration), the rollout engine
# actor named by the prefix is killed (`ray.kill`), so the run must replace it and restart from that checkpoint.
ENGINE_KILLER = """
import sys, time
from pathlib import Path
import ray
prefix, checkpoint, deadline = sys.argv[1], Path(sys.argv[2]), time.monotonic() + float(sys.argv[3])
ray.init(log_to_driver=False)  # the session's cluster (RAY_ADDRESS)
named = []
while not named and time.monotonic() < deadline:
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    time.sleep(0.2)
engine = ray.get_actor(named[0]["name"], namespace=named[0]["namespace"])
partial = checkpoint.with_name(f".{checkpoint.name}.partial")
while not (partial.is_dir() or checkpoint.is_dir()) and time.monotonic() < deadline:
    time.sleep(0.02)
ray.kill(engine, no_restart=True)
print("killed", named[0]["name"], "at", checkpoint.name)
"""


@pytest.fixture(scope="session")
def adapter_runs(ray_cluster, lora_run, tmp_path_factory, request) -> dict[str, tuple[Path, StartedLlmc]]:
    """The ReAct and GRPO runs behind `react_run` and `grpo_run`, started together (4 Train workers and an engine on
    the 8 logical CPUs): each fixture waits for its own, so one run's start-up overlaps the other's work. The GRPO
    run's engine actor is killed after its first checkpoint (`ENGINE_KILLER`)."""
    runs, killer = {}, None
    if wanted(request, "react_run"):
        react = tmp_path_factory.mktemp("react") / "run"
        runs["react"] = react, StartedLlmc("finetune", "workloads/configs/tiny-react.yaml", "--output-dir", str(react))
    if wanted(request, "grpo_run"):
        grpo = tmp_path_factory.mktemp("grpo") / "run"
        sets = (f"rl.adapter={lora_run['adapter']}", "rl.iterations=3", "rl.prompts_per_iteration=4",
                "rl.group_size=2", "rl.eval_prompts=9", "train.eval_every=1", "train.checkpoint_every=1")
        runs["grpo"] = grpo, StartedLlmc("align", "workloads/configs/tiny-grpo.yaml", "--output-dir", str(grpo),
                                         *[arg for o in sets for arg in ("--set", o)], timeout=600)
        killer = subprocess.Popen([sys.executable, "-c", ENGINE_KILLER, "tiny-grpo-rollout-engine-0-",
                                   str(grpo / "checkpoints/tiny-grpo/checkpoint_000001"), "600"], cwd=REPO,
                                  env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs["grpo"][1].killer = killer
    yield runs
    for _, run in runs.values():
        run.stop()
    if killer is not None and killer.poll() is None:
        killer.kill()
        killer.wait()


@pytest.fixture(scope="session")
def react_run(adapter_runs) -> dict:
    """The bundled ReAct recipe (LoRA on the calculator traces, 2 workers, DDP): the adapter the test server serves as
    `tiny:react`, so the agent tests compare the base with a model fine-tuned on the traces."""
    out, run = adapter_runs["react"]
    result = run.result()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "summary": summary, "adapter": Path(summary["artifact"])}


@pytest.fixture(scope="session")
def grpo_run(adapter_runs) -> dict:
    """A short run of the shipped GRPO recipe from `lora_run`'s adapter on the session's cluster (2 Train workers
    sampling from a vLLM engine actor; 3 iterations of 4 prompts x 2, 9 held-out prompts, a checkpoint after each),
    whose engine actor is killed once the first checkpoint is being written: its adapter is the one the test server
    serves as `tiny:aligned`. An iteration takes under a second, so the kill may land in the second iteration or
    after it: the third is there so that some iteration after the kill always calls the engine."""
    out, run = adapter_runs["grpo"]
    result = run.result()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    killed, _ = run.killer.communicate(timeout=60)
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "stdout": result.stdout, "stderr": result.stderr, "summary": summary,
            "adapter": Path(summary["artifact"]), "killed": killed}


def _registered_checkpoint(snapshot: Path) -> bool:
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return False


ALLOWED_ORIGIN = "https://app.example"  # the one browser origin the test server allows
SERVE_RECIPE = REPO / "workloads/configs/serve-tiny.yaml"


# The registered model the test server serves under a stable name (`tiny:prod`), gated by the bundled arithmetic
# eval's adapter variant on 30 cases (its key from GATE_KEY_ENV): tests/test_promote.py promotes and rolls it back.
PROMOTED_MODEL = "tiny-arith"
GATE_KEY_ENV = "LLMC_GATE_KEY"
PROMOTION = json.dumps({PROMOTED_MODEL: {"served_as": "prod", "gate": {
    "eval": "workloads/configs/tiny-eval.yaml", "variant": "adapter", "beats_champion_by": 0.1,
    "set": ["test_set.limit=30", f"endpoint.api_key_env={GATE_KEY_ENV}"]}}})  # JSON: a YAML mapping for --set


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    key: str
    process: ServeProcess
    other_key: str  # a second tenant's key
    registry_uri: str = ""  # the MLflow store whose registry `promotion.models` reads (empty at start)

    @property
    def lines(self) -> list[str]:
        return self.process.lines

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key or self.key, max_retries=0, timeout=300)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="session")
def server(ray_cluster, lora_run, react_run, grpo_run, tmp_path_factory):
    """`llmc serve` of the tiny model with `lora_run`'s adapter as `tiny:arith`, `react_run`'s as `tiny:react` and
    `grpo_run`'s as `tiny:aligned` on the session's cluster, two API keys from the environment, the adapter store a
    local S3 endpoint started by the driver (one vLLM engine start, about a minute on 2 cores, for every test that
    talks to a served model), and PROMOTED_MODEL declared as `tiny:prod` over an empty registry."""
    key, other_key = ("llmc-test-" + secrets.token_hex(12) for _ in range(2))
    registry_uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    process = ServeProcess(SERVE_RECIPE, overrides=[f"adapters.paths.arith={lora_run['adapter']}",
                                                    f"adapters.paths.react={react_run['adapter']}",
                                                    f"adapters.paths.aligned={grpo_run['adapter']}",
                                                    "autoscaling.upscale_delay_s=2",
                                                    f"server.cors_origins=[{ALLOWED_ORIGIN}]",
                                                    f"promotion.tracking_uri={registry_uri}",
                                                    f"promotion.models={PROMOTION}"],
                           env={**os.environ, "LLMC_API_KEYS": f"{key},{other_key}"})
    try:
        process.wait_ready(timeout_s=600)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield Server(process.base_url, key, process, other_key, registry_uri)
    process.stop()  # Ctrl-C: the driver deletes the app and stops its S3 endpoint
    # Serving runs until stopped: Ctrl-C is its normal end (a SIGKILL after a hung stop would be -9).
    assert process.proc.returncode == 0, "".join(process.lines[-40:])


def read_metrics_csv(out: Path) -> list[dict]:
    """The rows of a run's metrics.csv (one per step)."""
    with (out / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


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
        proc.wait(timeout=3)  # it often lingers well past its cluster; the kill below ends the rest
    except subprocess.TimeoutExpired:
        pass
    for pid, _ in session_processes(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_llmc(*args: str, timeout: float = 900, env: dict | None = None, cwd: Path = REPO,
             stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the real `llmc` entry point in a subprocess (`stdin` its input); output captured for assertions."""
    return subprocess.run(
        [sys.executable, "-m", "workloads.cli", *args], input=stdin,
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


class StartedLlmc:
    """The real `llmc` entry point started in a subprocess now and waited for later (`result`), so that runs which do
    not depend on each other overlap: much of a run is one core's worth of imports, Ray worker and engine start-up."""

    killer: subprocess.Popen | None = None  # a process that harms the run on purpose, waited for with it

    def __init__(self, *args: str, timeout: float = 900):
        # Files, not pipes: nobody reads this run's output while another one is waited for.
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "workloads.cli", *args], cwd=REPO, env=os.environ.copy(),
                                     stdout=self._out, stderr=self._err, text=True)
        self._deadline = time.monotonic() + timeout

    def result(self) -> subprocess.CompletedProcess:
        """Waits for the run (killed past its timeout, as `run_llmc`'s is); its output captured for assertions."""
        try:
            self.proc.wait(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._out.seek(0)
        self._err.seek(0)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self._out.read(), self._err.read())

    def stop(self) -> None:
        """Kills the run if it is still going (a test that would have waited for it failed first)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wanted(request: pytest.FixtureRequest, name: str) -> bool:
    """Whether this session runs the test `name` or a test using the fixture `name`: a fixture that starts runs
    together starts only those that a selected test waits for."""
    return any(name in (getattr(item, "originalname", None), *getattr(item, "fixturenames", ()))
               for item in request.session.items)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`-m "not slow"` stays fast: every test on the session's Ray cluster (Serve, vLLM, Train) is slow.

    Tests that need no tiny model run first, while a subprocess pretrains it (about 2 minutes on one core the
    first time on a machine); the `tiny_model_dir` fixture waits for that build, and meanwhile has the other core
    start the session's Ray head and build DeepSpeed's CPU op that every DeepSpeed run loads.
    """
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    needs_model = [item for item in items if "tiny_model_dir" in getattr(item, "fixturenames", ())]
    items.sort(key=lambda item: item in needs_model)  # stable: module order is kept within each group
    _first_on_server(items)
    if needs_model:
        _start_model_build()
    global _wants_cluster
    _wants_cluster = any("ray_cluster" in getattr(item, "fixturenames", ()) for item in items)


def _first_on_server(items: list[pytest.Item]) -> None:
    """Tests marked `first_on_server` go right before the first other user of the session's `server`: at its
    minimum replicas, before any load has scaled it up (a replica killed then is the endpoint's only one). Tests
    marked `last_on_server` go last: what they add to the server (promoted adapters in its store, an alias in its
    listing) is then seen by no test that lists its models exactly."""
    first = [item for item in items if item.get_closest_marker("first_on_server")]
    last = [item for item in items if item.get_closest_marker("last_on_server")]
    rest = [item for item in items if item not in first and item not in last]
    at = next((n for n, item in enumerate(rest) if {"server", "ray_cluster"} <= set(getattr(item, "fixturenames", ()))),
              len(rest))
    items[:] = rest[:at] + first + rest[at:] + last


def _start_model_build() -> None:
    global _model_build
    from workloads.models.recipe import TinyModelConfig
    from workloads.models.tiny import tiny_model_path

    if (tiny_model_path(TinyModelConfig()) / "config.json").exists():
        return
    with _BUILD_LOG.open("w") as log:  # the build takes the cache's lock; the fixture's own build waits on it
        _model_build = subprocess.Popen([sys.executable, "-m", "workloads.cli", "make-tiny-model"], cwd=REPO,
                                        stdout=log, stderr=subprocess.STDOUT)


def _start_op_build() -> None:
    """Compile DeepSpeed's shared-memory comm op (its CPU backend loads it at init; ~1 min of one core the first
    time on a machine, cached under ~/.cache/torch_extensions) at low priority, one compile job at a time. A run
    that needs it first waits on the build's lock instead of compiling it again."""
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)"
    subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", code], cwd=REPO, env={**os.environ, "MAX_JOBS": "1"},
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def pytest_sessionfinish() -> None:
    if _model_build is not None and _model_build.poll() is None:  # the run ended before any test needed it
        _model_build.kill()
    if _ray_head is not None:  # started early, never handed to a test
        _stop_session(_ray_head[0])
