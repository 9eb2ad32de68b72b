"""Monitoring: a train run under its recipe's name, its `llmc_train_*` series on the real node's Prometheus
export matching metrics.csv, what a rerun into the same directory does, `llmc status`, and the Grafana
dashboard reading only series the code exports. Serving metrics are checked in test_serve.py, on its server.
"""

from __future__ import annotations

import csv
import json
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.metrics import SERVE_COUNTERS, TRAIN_GAUGES, TRAIN_METRIC_PREFIX, exported_name, scrape
from tests.conftest import REPO, run_llmc

DASHBOARD = REPO / "monitoring" / "grafana-llmc.json"
RECIPE = REPO / "workloads" / "configs" / "tiny-lora.yaml"
STEPS = 10


def dashboard_series() -> set[str]:
    """Every `ray_*` series name the Grafana dashboard's queries read."""
    exprs = []

    def walk(node) -> None:
        if isinstance(node, dict):
            exprs.extend(str(v) for k, v in node.items() if k in ("expr", "definition"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text()))
    return {name for expr in exprs for name in re.findall(r"\bray_[A-Za-z0-9_]+", expr)}


def test_grafana_dashboard_reads_every_series_we_export_and_only_those():
    ours = {n for n in dashboard_series() if n.startswith("ray_llmc_")}
    exported = {exported_name(TRAIN_METRIC_PREFIX + key) for key in TRAIN_GAUGES}
    exported |= {exported_name(name, "counter") for name in SERVE_COUNTERS}
    assert ours == exported
    others = dashboard_series() - ours
    assert others and all(n.startswith(("ray_vllm_", "ray_serve_")) for n in others), others  # checked live


def read_rows(out: Path) -> list[dict]:
    with (out / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def finetune(out: Path, name: str, *overrides: str, flags: tuple[str, ...] = ()) -> dict:
    sets = [arg for o in (f"run.name={name}", "deepspeed.enabled=false", *overrides) for arg in ("--set", o)]
    result = run_llmc("finetune", str(RECIPE), "--output-dir", str(out), *sets, *flags)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def run_values(samples, run: str) -> dict[str, float]:
    """This run's `llmc_train_*` values on the export (one training process publishes them)."""
    wanted = {exported_name(TRAIN_METRIC_PREFIX + key): key for key in TRAIN_GAUGES}
    return {wanted[n]: v for n, labels, v in samples if n in wanted and labels.get("run") == run}


@pytest.fixture(scope="module")
def watched_run(ray_cluster, tmp_path_factory):
    """A tiny fine-tune whose node export and `llmc status` are read while it runs (gauges vanish ~15 s
    after the worker that set them exits, so reading only afterwards would race)."""
    from cluster.status import collect

    out, name = tmp_path_factory.mktemp("monitored") / "run", f"mon-{secrets.token_hex(3)}"
    args = ["finetune", str(RECIPE), "--output-dir", str(out)]
    for override in (f"run.name={name}", f"train.max_steps={STEPS}", "train.eval_every=5", "train.checkpoint_every=5",
                     "train.log_every=1", "deepspeed.enabled=false"):
        args += ["--set", override]
    log = out.parent / "finetune.log"  # a file, not a pipe: nobody reads a pipe while this loop polls
    proc = subprocess.Popen([sys.executable, "-m", "workloads.cli", *args], cwd=REPO, text=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    last, status_run, ended = {}, None, None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            values = run_values(scrape(ray_cluster.metrics_url), name)
        except OSError:  # the node's metrics agent starts a little after the dashboard
            values = {}
        last = values or last
        if status_run is None and values.get("step", 0) >= 1:
            status_run = next((r for r in collect(ray_cluster.dashboard_url)["train_runs"] if r["name"] == name), None)
        if proc.poll() is not None:
            ended = ended or time.monotonic()
            if last.get("step") == STEPS or time.monotonic() - ended > 30:
                break
        time.sleep(1)
    proc.wait(timeout=60)
    output = log.read_text()
    assert proc.returncode == 0, output[-5000:]
    return {"out": out, "name": name, "last": last, "status_run": status_run, "output": output}



@pytest.mark.slow
def test_train_run_is_named_after_the_recipe_and_prints_its_dashboard_url(watched_run, ray_cluster):
    name, out = watched_run["name"], watched_run["out"]
    url = re.search(rf"\[llmc\] run {name}: dashboard (\S+)", watched_run["output"]).group(1)
    assert url.startswith(f"{ray_cluster.dashboard_url}/#/jobs/")
    # The page's job is the driver that ran this fine-tune (the dashboard reads /api/jobs/<id> for it).
    from cluster.jobs import auth_headers

    job_api = f"{ray_cluster.dashboard_url}/api/jobs/{url.rsplit('/', 1)[1]}"
    with urllib.request.urlopen(urllib.request.Request(job_api, headers=auth_headers()), timeout=30) as resp:
        job = json.loads(resp.read())
    assert job["type"] == "DRIVER" and "finetune" in job["entrypoint"] and name in job["entrypoint"], job
    kept = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in kept] == [name]  # Ray Train's storage is named after the run, not a timestamp
    assert len([c for c in kept[0].glob("checkpoint_*") if c.is_dir()]) == 2


@pytest.mark.slow
def test_train_metrics_on_the_node_export_match_metrics_csv(watched_run):
    rows, last = read_rows(watched_run["out"]), watched_run["last"]
    final = rows[-1]
    assert int(final["step"]) == STEPS and last["step"] == STEPS, last
    for key in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_second"):
        assert last[key] == pytest.approx(float(final[key]), rel=1e-6), key
    assert last["restarts"] == 0


@pytest.mark.slow
def test_llmc_status_showed_the_running_train_run_with_step_and_loss(watched_run):
    run, rows = watched_run["status_run"], read_rows(watched_run["out"])
    assert run is not None, "the run never showed in llmc status while it ran"
    assert run["status"] == "RUNNING" and 1 <= run["step"] <= STEPS, run
    assert run["loss"] == pytest.approx(float(rows[int(run["step"]) - 1]["loss"]), rel=1e-6)


@pytest.mark.slow
def test_a_rerun_into_the_same_dir_needs_overwrite_and_starts_fresh_unless_resume_latest(watched_run):
    """Ray Train V2 would continue any run it finds under `storage/name`; llmc asks for it explicitly."""
    out, name = watched_run["out"], watched_run["name"]
    resumed = finetune(out, name, f"train.max_steps={STEPS + 4}", "train.checkpoint_every=2",
                       "run.resume_from=latest")
    assert resumed["restarts"] == [{"from_step": STEPS, "via": "resume_from"}]
    assert [int(r["step"]) for r in read_rows(out)] == list(range(1, STEPS + 5))
    refused = run_llmc("finetune", str(RECIPE), "--output-dir", str(out), "--set", f"run.name={name}")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr  # never replaced silently
    fresh = finetune(out, name, "train.max_steps=2", "train.checkpoint_every=2", flags=("--overwrite",))
    assert fresh["restarts"] == [] and fresh["steps"] == 2 and fresh["initial_eval_loss"] is not None
    assert [int(r["step"]) for r in read_rows(out)] == [1, 2]
    kept = [c for c in (out / "checkpoints" / name).glob("checkpoint_*") if c.is_dir()]
    assert len(kept) == 1 and json.loads((kept[0] / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.slow
def test_resume_latest_without_an_earlier_run_fails_clearly(ray_cluster, tmp_path):
    result = run_llmc("finetune", str(RECIPE), "--output-dir", str(tmp_path / "none"),
                      "--set", "run.resume_from=latest", "--set", "deepspeed.enabled=false")
    assert result.returncode != 0
    assert "no checkpoint of run 'tiny-lora' to resume" in result.stdout + result.stderr


@pytest.mark.slow
def test_llmc_status_lists_a_submitted_job(ray_cluster):
    submitted = run_llmc("submit", "--address", ray_cluster.dashboard_url, "--no-wait", "--",
                         "validate", "workloads/configs/tiny-lora.yaml")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"submitted (\S+) to", submitted.stdout).group(1)
    result = run_llmc("status", "--address", ray_cluster.dashboard_url, "--json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    job = next(j for j in json.loads(result.stdout)["jobs"] if j["id"] == job_id)
    assert job["status"] in ("PENDING", "RUNNING", "SUCCEEDED") and "validate" in job["entrypoint"]
    table = run_llmc("status", "--address", ray_cluster.dashboard_url, timeout=120)
    assert table.returncode == 0 and job_id in table.stdout and "Jobs" in table.stdout, table.stdout


def test_llmc_status_without_a_cluster_says_so_and_exits_1():
    result = run_llmc("status", "--address", "http://127.0.0.1:9", timeout=120)
    assert result.returncode == 1
    assert "no Ray cluster answers at http://127.0.0.1:9" in result.stderr and "Traceback" not in result.stderr
