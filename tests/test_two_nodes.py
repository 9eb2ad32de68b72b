"""Two Ray nodes on one machine: what a one-node run relies on, and what a cluster of machines needs instead.

A cluster of its own for this module (not the session's, whose served model could autoscale onto a second node):
a head and a second raylet, each `ray start --block` in a process session of its own, so a test finds a node's
processes (and kills one) by session, and teardown stops exactly them. The second node runs at 127.0.0.2 (Linux
routes all of 127/8 to loopback) and offers a custom resource `node2`: to the driver, whose node is the head, it
is another machine, and work can be pinned to it. Both raylets get the environment the nodes of a real cluster
would have for shared storage: an S3 endpoint (moto, in this process) on an address every node reaches, this
machine's non-loopback IP, with placeholder credentials. Where this process may create a mount namespace (root),
node 2 runs in one of its own with a directory hidden under an empty tmpfs: files there are the driver machine's
only, as they would be on a real cluster.

The LoRA run puts one worker on each node (STRICT_SPREAD), checkpoints to that S3 bucket, loses node 2's worker
after a checkpoint and resumes from the bucket; the serve recipe pins its engine replica to node 2 and loads the
run's adapter from the bucket. What worked on one node only because everything shared one machine (checkpoints
in the run directory, an S3 endpoint on 127.0.0.1, a model or checkpoint directory on the driver's disk) is refused
with exit 2 and the field to change.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.conftest import REPO, SERVE_RECIPE, _stop_session, _wait_for_dashboard, run_llmc, session_processes
from workloads.common.recipe import RecipeError
from workloads.kinds import load_recipe
from workloads.serve.deploy import ServeProcess
from workloads.serve.objectstore import LocalS3, free_port

NODE2_IP = "127.0.0.2"  # a second loopback address: another machine, as far as the driver can tell by IP
BUCKET = "llmc-two-nodes"
LORA_RECIPE = REPO / "workloads/configs/tiny-lora.yaml"
DPO_RECIPE, GRPO_RECIPE = REPO / "workloads/configs/tiny-dpo.yaml", REPO / "workloads/configs/tiny-grpo.yaml"
STEPS, CHECKPOINT_EVERY = 12, 3
SMALL_DATA = "workloads/bundled/arithmetic_test.jsonl"


@dataclass(frozen=True)
class TwoNodes:
    address: str  # the head's GCS address, for RAY_ADDRESS
    dashboard: str  # the head's dashboard: Ray's State API
    head: subprocess.Popen  # `ray start --head --block`; its pid is its process session's id
    node2: subprocess.Popen  # `ray start --address ... --block` of the second node
    s3: LocalS3  # the shared object store every node reaches
    temp_dir: Path
    driver_only: Path | None  # a directory node 2 does not see (None: no mount namespace here, it sees every file)

    @property
    def env(self) -> dict[str, str]:
        """A driver's environment on this cluster: its address and the S3 endpoint the nodes have."""
        return {"RAY_ADDRESS": self.address, **self.s3.endpoint.env()}

    def processes(self, node: str, prefix: str) -> list[int]:
        """Pids of the processes on `node` ("head" or "node2") whose command line starts with `prefix`."""
        sid = (self.head if node == "head" else self.node2).pid
        return [pid for pid, command in session_processes(sid) if command.startswith(prefix)]


def reachable_ip() -> str:
    """This machine's address on its default route (as Ray picks a node's IP): other machines would reach it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"


@pytest.fixture(scope="module")
def two_nodes(tiny_model_dir, request):
    """The two-node cluster and its S3 endpoint, for this module's tests; stopped (every process) at the end, its
    temp dir (Ray's logs) kept only if a test failed."""
    from cluster.auth import ensure_auth_token

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's line per request
    ip = reachable_ip()
    if ip.startswith("127."):
        pytest.skip("no non-loopback address on this machine for the shared S3 endpoint")
    ensure_auth_token()  # `ray start --head` exits 1 on a machine without a token
    temp_dir = Path(tempfile.mkdtemp(prefix="rt2-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    ray_bin = str(Path(sys.executable).with_name("ray"))
    common = ["--block", "--num-cpus=2", "--object-store-memory=200000000", f"--temp-dir={temp_dir}",
              "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}"]
    port, dashboard = free_port(), f"http://127.0.0.1:{free_port()}"
    with LocalS3(host=ip) as s3:
        s3.endpoint.client().create_bucket(Bucket=BUCKET)
        env = {**os.environ, **s3.endpoint.env()}  # what every node of a real cluster has for its object store
        env.pop("RAY_ADDRESS", None)
        # The dashboard is needed: Ray Train's PlacementGroupCleaner asks its State API whether the run's controller
        # lives, and without it took the controller for dead and removed the run's placement group mid-start.
        head = _ray_start([ray_bin, "start", "--head", f"--port={port}", '--resources={"head": 1}',
                           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
                           f"--ray-client-server-port={free_port()}", *common], env, temp_dir / "head.log")
        node2 = None
        try:
            _wait_for_dashboard(dashboard, head, temp_dir / "head.log")
            driver_only = temp_dir / "driver-only"
            own_mounts = _own_mounts(driver_only)
            if own_mounts:  # a model directory the driver has and node 2 does not
                shutil.copytree(tiny_model_dir, driver_only / "tiny")
            node2 = _ray_start([*own_mounts, ray_bin, "start", f"--address=127.0.0.1:{port}",
                                f"--node-ip-address={NODE2_IP}", '--resources={"node2": 1}', *common],
                               env, temp_dir / "node2.log")
            _wait_for_line("Ray runtime started", node2, temp_dir / "node2.log")
            yield TwoNodes(f"127.0.0.1:{port}", dashboard, head, node2, s3, temp_dir,
                           driver_only if own_mounts else None)
        finally:
            for proc in (node2, head):
                if proc is not None:
                    _stop_session(proc)
            if not request.session.testsfailed:
                shutil.rmtree(temp_dir, ignore_errors=True)


def _own_mounts(hidden: Path) -> list[str]:
    """A command prefix that runs a command in a mount namespace of its own, with `hidden` (created here) under an
    empty tmpfs; [] where this process may not make one (unshare needs root or CAP_SYS_ADMIN)."""
    hidden.mkdir()
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs llmc-node2 "{hidden}" && exec "$@"', "node2"]
    if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
        return prefix
    return []


def _ray_start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for_line(text: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def _s3_keys(s3: LocalS3, prefix: str) -> list[str]:
    pages = s3.endpoint.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _registered_checkpoint(client, key: str) -> bool:
    """Whether Ray Train's controller has registered a checkpoint (its snapshot in the bucket names one)."""
    try:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return json.loads(body).get("latest_checkpoint_result") is not None
    except Exception:  # noqa: BLE001 - not written yet (NoSuchKey), or caught mid-write
        return False


# ---------------------------------------------------------------------------------------------
# The recipe field that pins replicas to nodes (no cluster needed)
# ---------------------------------------------------------------------------------------------


def test_custom_resources_reach_every_engine_bundle_and_built_in_names_are_refused():
    from workloads.serve.plan import serve_plan

    recipe = load_recipe(SERVE_RECIPE, ["resources.custom={node2: 1}", "engine.tensor_parallel_size=2",
                                        "adapters.paths={}"])
    plan = serve_plan(recipe)
    assert plan["placement_bundles_per_replica"] == [{"CPU": 2, "node2": 1}, {"CPU": 1, "node2": 1}]
    assert plan["total_resources_at_max_replicas"]["node2"] == 4  # 2 replicas x 2 engine workers
    for bad, message in (("{CPU: 2}", "have fields of their own"), ("{'accelerator_type:A100': 1}", "own"),
                         ("{node2: 0}", "amount above 0"), ("{node2: -1}", "amount above 0")):
        with pytest.raises(RecipeError, match=rf"resources\.custom.*{message}"):
            load_recipe(SERVE_RECIPE, [f"resources.custom={bad}"])


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                             ("::1", True), ("[::1]", True), ("192.0.2.2", False),
                                             ("minio.internal", False), (None, False)])
def test_loopback_means_this_machine_only(host, loopback):
    from workloads.common.multinode import is_loopback

    assert is_loopback(host) is loopback


def test_an_adapter_store_on_loopback_is_said_how():
    from workloads.common.multinode import loopback_adapter_store
    from workloads.serve.recipe import AdaptersConfig

    assert loopback_adapter_store(AdaptersConfig()) == ("'local' runs the adapter store on this machine's loopback "
                                                        "(127.0.0.1)")
    assert loopback_adapter_store(AdaptersConfig(endpoint_url="http://[::1]:9000")) == ("http://[::1]:9000 is this "
                                                                                        "machine's loopback")
    assert loopback_adapter_store(AdaptersConfig(endpoint_url="http://192.0.2.2:9000")) is None
    assert loopback_adapter_store(AdaptersConfig(endpoint_url=None)) is None  # the provider's (AWS S3)
    assert loopback_adapter_store(AdaptersConfig(enabled=False)) is None  # no store at all


def test_a_loopback_adapter_url_is_refused_for_a_remote_cluster_before_ray():
    from workloads.serve.deploy import check_before_start

    recipe = load_recipe(SERVE_RECIPE, ["adapters.paths={}", "adapters.endpoint_url=http://127.0.0.1:9000"])
    with pytest.raises(RecipeError, match=r"field 'adapters.endpoint_url': http://127.0.0.1:9000 is this machine's "
                                          r"loopback, which replicas on other nodes of the cluster at 10.0.0.5:6379"):
        check_before_start(recipe, [], address="10.0.0.5:6379")
    # `auto` is a cluster on this machine: its nodes' IPs are checked once connected (check_serving).
    assert check_before_start(recipe, [], address="auto") == {}


# ---------------------------------------------------------------------------------------------
# On the two-node cluster
# ---------------------------------------------------------------------------------------------


def _refused_case(case: str, two_nodes: TwoNodes, out: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """(llmc arguments, extra environment, the messages expected) of one case that a second machine breaks."""
    serve = ["serve", str(SERVE_RECIPE), "--set", "adapters.paths={}"]
    # The bundled test set as training data: tokenized in 0.1 s (the training set takes 3 s), and it never trains.
    finetune = ["finetune", str(LORA_RECIPE), "--output-dir", str(out), "--set", f"data.path={SMALL_DATA}",
                "--set", "data.eval_path=null"]
    only = two_nodes.driver_only
    if case == "serve-local-store":  # the recipe's default: an S3 endpoint on the driver's 127.0.0.1
        return serve, {}, ["field 'adapters.endpoint_url': 'local' runs the adapter store on this machine's loopback"]
    if case == "finetune-run-dir-storage":  # no run.storage_path: checkpoints under the run dir, on this machine
        return finetune, {}, ["field 'run.storage_path': not set, so checkpoints go to"]
    if case == "finetune-loopback-s3":  # the driver reaches S3 on its own loopback, as a one-machine setup would
        loopback = f"http://127.0.0.1:{two_nodes.s3.port}"
        return [*finetune, "--set", f"run.storage_path=s3://{BUCKET}/refused"], {"AWS_ENDPOINT_URL_S3": loopback}, [
            f"field 'run.storage_path': s3://{BUCKET}/refused is reached through $AWS_ENDPOINT_URL_S3={loopback}"]
    if case == "finetune-driver-only-paths":  # both problems named at once
        return [*finetune, "--set", f"model.name={only}/tiny", "--set", f"run.storage_path={only}/checkpoints"], {}, [
            f"field 'model.name': {only}/tiny is on this machine but not on the cluster's nodes at {NODE2_IP}",
            f"field 'run.storage_path': {only}/checkpoints is on this machine but not on the cluster's nodes"]
    if case == "dpo-driver-only-start-adapter":  # the pairs go to the workers; the start adapter they read
        adapter = _driver_only_files(only / "start-adapter", "adapter_config.json")
        return ["align", str(DPO_RECIPE), "--output-dir", str(out), "--set", f"run.storage_path=s3://{BUCKET}/dpo",
                "--set", f"dpo.adapter={adapter}"], {}, [
            f"field 'dpo.adapter': {adapter} is on this machine but not on the cluster's nodes at {NODE2_IP}"]
    if case == "grpo-driver-only-adapter-reward-model-and-run-dir":
        adapter = _driver_only_files(only / "start-adapter", "adapter_config.json")
        reward_model = _driver_only_files(only / "reward-model", "config.json")
        run_dir = only / "grpo-run"
        return ["align", str(GRPO_RECIPE), "--output-dir", str(run_dir), "--set", "rl.rollout=generate",
                "--set", f"run.storage_path={run_dir}-checkpoints", "--set", f"rl.adapter={adapter}",
                "--set", f"rewards=[{{function: exact_answer}}, {{model: '{reward_model}'}}]"], {}, [
            f"field 'rewards.1.model': {reward_model} is on this machine but not on the cluster's nodes at {NODE2_IP}",
            f"field 'rl.adapter': {adapter} is on this machine but not on the cluster's nodes at {NODE2_IP}",
            f"field 'run.output_dir': {run_dir} is on this machine but not on the cluster's nodes at {NODE2_IP}",
            f"field 'run.storage_path': {run_dir}-checkpoints is on this machine but not on the cluster's nodes"]
    assert case == "serve-loopback-url-and-driver-only-model"
    return [*serve, "--set", "adapters.endpoint_url=http://localhost:9000", "--set", f"model.name={only}/tiny"], {}, [
        "field 'adapters.endpoint_url': http://localhost:9000 is this machine's loopback, which replicas on the "
        f"cluster's nodes at {NODE2_IP} cannot reach",
        f"field 'model.name': {only}/tiny is on this machine but not on the cluster's nodes at {NODE2_IP}"]


def _driver_only_files(directory: Path, name: str) -> Path:
    """A directory on the driver's disk only holding `name` (a LoRA rank-8 adapter's config, or a model's): enough
    for the recipe schema, which only looks for the file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    return directory


REFUSED_CASES = ("serve-local-store", "finetune-run-dir-storage", "finetune-loopback-s3", "finetune-driver-only-paths",
                 "serve-loopback-url-and-driver-only-model", "dpo-driver-only-start-adapter",
                 "grpo-driver-only-adapter-reward-model-and-run-dir")
NEEDS_DRIVER_ONLY = ("finetune-driver-only-paths", "serve-loopback-url-and-driver-only-model",
                     "dpo-driver-only-start-adapter", "grpo-driver-only-adapter-reward-model-and-run-dir")


@pytest.mark.slow
def test_what_one_machine_relied_on_is_refused_naming_the_field(two_nodes, tmp_path):
    """Every case its own `llmc` process, all at once: each spends its seconds importing and connecting, then is
    refused before any work, naming the field and node 2's IP."""
    from concurrent.futures import ThreadPoolExecutor

    cases = {case: _refused_case(case, two_nodes, tmp_path / case / "run") for case in REFUSED_CASES
             if two_nodes.driver_only is not None or case not in NEEDS_DRIVER_ONLY}

    def refuse(case: str) -> tuple[str, object, float]:
        args, env, _ = cases[case]
        started = time.monotonic()
        return case, run_llmc(*args, env={**two_nodes.env, **env}, timeout=300), time.monotonic() - started

    with ThreadPoolExecutor(len(cases)) as pool:
        outcomes = list(pool.map(refuse, cases))
    for case, result, seconds in outcomes:
        output = result.stdout + result.stderr
        assert result.returncode == 2, f"{case}: {output[-3000:]}"
        for message in cases[case][2]:
            assert message in result.stderr, f"{case}: {output[-3000:]}"
        assert NODE2_IP in result.stderr, case  # names the node that could not reach it
        assert "[llmc] deploying" not in output and "[llmc] run " not in output, case  # refused before any work
        assert not (tmp_path / case / "run" / "checkpoints").exists(), case
        print(f"{case}: refused in {seconds:.1f}s")
    if len(cases) < len(REFUSED_CASES):
        pytest.skip("node 2 shares every file of this machine here (no mount namespace without root): "
                    f"{', '.join(NEEDS_DRIVER_ONLY)} not run")


@pytest.fixture(scope="module")
def two_node_lora(two_nodes, tmp_path_factory) -> dict:
    """The LoRA recipe as shipped (DeepSpeed ZeRO-2, gloo between the nodes) with one worker per node and
    checkpoints in the bucket. Once Ray Train has registered a checkpoint, node 2's worker is SIGKILLed: the worker
    group restarts on both nodes from the bucket's checkpoint."""
    out = tmp_path_factory.mktemp("two-node-lora") / "run"
    args = ["finetune", str(LORA_RECIPE), "--output-dir", str(out)]
    for override in ("scaling.placement_strategy=STRICT_SPREAD", f"run.storage_path=s3://{BUCKET}/checkpoints",
                     f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}"):
        args += ["--set", override]
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "workloads.cli", *args], cwd=REPO,
                            env={**os.environ, **two_nodes.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    snapshot, client = "checkpoints/tiny-lora/checkpoint_manager_snapshot.json", two_nodes.s3.endpoint.client()
    deadline, killed, killed_after, head_workers = time.monotonic() + 600, None, None, []
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if _registered_checkpoint(client, snapshot):
            node2_workers = two_nodes.processes("node2", "ray::RayTrainWorker")
            head_workers = two_nodes.processes("head", "ray::RayTrainWorker")
            if node2_workers:
                killed, killed_after = node2_workers[0], time.monotonic() - started
                os.kill(killed, signal.SIGKILL)
        # Ray Train's controller registers checkpoints and sees its workers finish on one 0.5 s poll
        # (cluster/train.py): a kill within 0.5 s of the registration lands before the run can end, on any machine.
        time.sleep(0.05)
    printed, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, printed[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "printed": printed, "summary": summary, "killed": killed, "head_workers": head_workers,
            "adapter": Path(summary["artifact"]), "seconds": time.monotonic() - started, "killed_after": killed_after}


@pytest.mark.slow
def test_lora_on_two_nodes_resumes_from_the_object_store_after_losing_node2s_worker(two_nodes, two_node_lora):
    run = two_node_lora
    # One worker per node: node 2's was killed while the head's trained beside it.
    assert run["killed"] is not None, "no RayTrainWorker on node 2 once a checkpoint was registered:\n" + \
        run["printed"][-3000:]
    assert run["head_workers"], "no RayTrainWorker on the head beside node 2's"
    restarts = run["summary"]["restarts"]
    assert [r["via"] for r in restarts] == ["failure"], restarts
    assert restarts[0]["from_step"] >= CHECKPOINT_EVERY and restarts[0]["from_step"] % CHECKPOINT_EVERY == 0
    assert run["summary"]["steps"] == STEPS
    # The checkpoints are in the bucket, the last one included, not on any node's disk.
    states = [key for key in _s3_keys(two_nodes.s3, "checkpoints/tiny-lora/") if key.endswith("/trainer_state.json")]
    steps = {json.loads(two_nodes.s3.endpoint.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())["step"]
             for key in states}
    assert STEPS in steps, states
    assert (run["adapter"] / "adapter_config.json").is_file()
    assert run["summary"]["storage"] == f"s3://{BUCKET}/checkpoints/tiny-lora"  # where a resume finds it
    print(f"two-node LoRA run: {run['seconds']:.0f}s, node 2's worker killed at {run['killed_after']:.0f}s, resumed "
          f"from step {restarts[0]['from_step']}")


@pytest.mark.slow
def test_serve_places_the_engine_on_node2_with_adapters_from_the_object_store(two_nodes, two_node_lora):
    started = time.monotonic()
    overrides = [f"adapters.paths.arith={two_node_lora['adapter']}",
                 f"adapters.endpoint_url={two_nodes.s3.endpoint_url}", f"adapters.store_uri=s3://{BUCKET}/adapters",
                 "resources.custom={node2: 1}", "autoscaling.max_replicas=1"]
    # Both nodes' Serve proxies bind 127.0.0.1:PORT on this one machine (Ray Serve sets SO_REUSEPORT).
    process = ServeProcess(SERVE_RECIPE, overrides=overrides,
                           env={**os.environ, **two_nodes.env, "LLMC_API_KEYS": ""})
    try:
        process.wait_ready(timeout_s=400)
        up = time.monotonic() - started
        engine = "ServeReplica:llmc:LLMServer"
        assert two_nodes.processes("node2", f"ray::{engine}") and not two_nodes.processes("head", f"ray::{engine}")
        assert two_nodes.processes("node2", "VLLM::EngineCore")
        assert "adapters/arith/adapter_config.json" in _s3_keys(two_nodes.s3, "adapters/arith/")
        client = openai.OpenAI(base_url=f"{process.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert {m.id for m in client.models.list()} == {"tiny", "tiny:arith"}
        answers = {model: client.completions.create(model=model, prompt="Add: 17 + 72", max_tokens=8,
                                                    temperature=0).choices[0].text
                   for model in ("tiny", "tiny:arith")}
        assert all(answers.values()) and answers["tiny"] != answers["tiny:arith"], answers  # the adapter loaded
    finally:
        process.stop()
    print(f"serve with its engine on node 2: ready in {up:.0f}s, answers {answers}")
