"""Monitoring: a train run under its recipe's name, its `llmc_train_*` series on the real node's Prometheus
export matching metrics.csv, what a rerun into the same directory does, `llmc status` (of a train run while it
runs: test_lifecycle.py), and the Grafana dashboard reading only series the code exports. Serving metrics are
checked in test_serve.py, on its server.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from cluster.metrics import SERVE_COUNTERS, TRAIN_GAUGES, TRAIN_METRIC_PREFIX, exported_name
from tests.conftest import REPO, WATCHED_STEPS, read_metrics_csv, run_llmc

DASHBOARD = REPO / "monitoring" / "grafana-llmc.json"
RECIPE = REPO / "workloads" / "configs" / "tiny-lora.yaml"
STEPS = WATCHED_STEPS  # the shared watched run's (tests/conftest.py)


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


def finetune(out: Path, name: str, *overrides: str, flags: tuple[str, ...] = ()) -> dict:
    sets = [arg for o in (f"run.name={name}", "deepspeed.enabled=false", *overrides) for arg in ("--set", o)]
    result = run_llmc("finetune", str(RECIPE), "--output-dir", str(out), *sets, *flags)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_train_run_is_named_after_the_recipe_and_prints_its_dashboard_url(watched_finetune, ray_cluster):
    name, output = watched_finetune["name"], watched_finetune["output"]
    url = re.search(rf"\[llmc\] run {name}: dashboard (\S+)", output).group(1)
    assert url.startswith(f"{ray_cluster.dashboard_url}/#/jobs/")
    # The page's job is the one that ran this fine-tune (the dashboard reads /api/jobs/<id> for it).
    from cluster.jobs import auth_headers

    job_api = f"{ray_cluster.dashboard_url}/api/jobs/{url.rsplit('/', 1)[1]}"
    with urllib.request.urlopen(urllib.request.Request(job_api, headers=auth_headers()), timeout=30) as resp:
        job = json.loads(resp.read())
    submitted = re.search(r"submitted (\S+) to", output).group(1)
    assert job["submission_id"] == submitted and name in job["entrypoint"], job
    # Ray Train's storage is named after the run, not a timestamp
    assert watched_finetune["storage"] == {name: [5, 10]}

@pytest.mark.slow
def test_train_metrics_on_the_node_export_match_metrics_csv(watched_finetune):
    """The newest values read from the export are those of the step they name (the last step's, unless the workers
    exited before their next export: Ray exports on an interval and does not flush at exit)."""
    rows, last = watched_finetune["rows"], watched_finetune["last"]
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert 1 <= last.get("step", 0) <= STEPS, last
    seen = rows[int(last["step"]) - 1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_second"):
        assert last[key] == pytest.approx(float(seen[key]), rel=1e-6), key
    evaluated = [r for r in rows[:int(last["step"])] if r["eval_loss"]]  # a gauge keeps its newest value
    if evaluated:
        assert last["eval_loss"] == pytest.approx(float(evaluated[-1]["eval_loss"]), rel=1e-6)
    assert last["restarts"] == 0


@pytest.mark.slow
def test_a_rerun_needs_overwrite_resume_latest_continues_and_an_explicit_checkpoint_resumes_in_bf16(watched_finetune):
    """Ray Train V2 would continue any run it finds under `storage/name`; llmc asks for it explicitly. A rerun with
    `resume_from: latest` continues the run in the directory; without it, the directory is replaced only with
    `--overwrite`, and then nothing of the old run is continued: here it resumes from an explicit checkpoint (the
    watched run's final one, DDP, 10 steps) in bf16 mixed precision, its fp32 weights staying the master weights."""
    out, name = watched_finetune["out"], watched_finetune["name"]
    resumed = finetune(out, name, f"train.max_steps={STEPS + 4}", "train.checkpoint_every=2",
                       "run.resume_from=latest")
    assert resumed["restarts"] == [{"from_step": STEPS, "via": "resume_from"}]
    assert [int(r["step"]) for r in read_metrics_csv(out)] == list(range(1, STEPS + 5))
    refused = run_llmc("finetune", str(RECIPE), "--output-dir", str(out), "--set", f"run.name={name}")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr  # never replaced silently
    steps = STEPS + 6
    replaced = finetune(out, name, f"train.max_steps={steps}", "train.checkpoint_every=6", "model.dtype=bfloat16",
                        f"run.resume_from={watched_finetune['checkpoint']}", flags=("--overwrite",))
    # From the explicit checkpoint (step 10), not from the replaced run's latest (step 14).
    assert replaced["steps"] == steps and replaced["restarts"] == [{"from_step": STEPS, "via": "resume_from"}]
    rows = read_metrics_csv(out)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    kept = [json.loads((c / "trainer_state.json").read_text())["step"]
            for c in (out / "checkpoints" / name).glob("checkpoint_*") if c.is_dir()]
    assert sorted(kept) == [12, steps]  # only this run's checkpoints


@pytest.mark.slow
def test_resume_latest_without_an_earlier_run_fails_clearly(ray_cluster, tmp_path):
    result = run_llmc("finetune", str(RECIPE), "--output-dir", str(tmp_path / "none"),
                      "--set", "run.resume_from=latest", "--set", "deepspeed.enabled=false")
    assert result.returncode != 0
    assert "no checkpoint of run 'tiny-lora' to resume" in result.stdout + result.stderr


@pytest.mark.slow
def test_llmc_status_lists_a_submitted_job(watched_finetune, ray_cluster):
    job_id = re.search(r"submitted (\S+) to", watched_finetune["output"]).group(1)
    running = next(j for j in watched_finetune["status_jobs"] if j["id"] == job_id)  # seen while it ran
    assert running["status"] == "RUNNING" and "finetune" in running["entrypoint"], running
    result = run_llmc("status", "--address", ray_cluster.dashboard_url, "--json", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    job = next(j for j in json.loads(result.stdout)["jobs"] if j["id"] == job_id)
    assert job["status"] == "SUCCEEDED" and "finetune" in job["entrypoint"], job
    table = run_llmc("status", "--address", ray_cluster.dashboard_url, timeout=120)
    assert table.returncode == 0 and job_id in table.stdout and "Jobs" in table.stdout, table.stdout


def test_llmc_status_without_a_cluster_says_so_and_exits_1():
    result = run_llmc("status", "--address", "http://127.0.0.1:9", timeout=120)
    assert result.returncode == 1
    assert "no Ray cluster answers at http://127.0.0.1:9" in result.stderr and "Traceback" not in result.stderr
