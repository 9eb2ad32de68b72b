"""`llmc submit` against the session's real `ray start --head` cluster: the job API, the uploaded working dir."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_llmc

pytestmark = pytest.mark.slow


def test_submit_runs_a_tiny_finetune_job_to_completion(ray_cluster, tmp_path):
    out = tmp_path / "submitted"
    result = run_llmc("submit", "--address", ray_cluster.dashboard_url, "--",
                      "finetune", "workloads/configs/tiny-lora.yaml", "--output-dir", str(out),
                      "--set", "train.max_steps=6", "--set", "train.eval_every=6", "--set", "train.checkpoint_every=6")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "SUCCEEDED" in output and f"{ray_cluster.dashboard_url}/#/jobs/" in output
    assert "step     6/6" in output and "fine-tuning summary" in output  # the job's own log was followed
    summary = json.loads((out / "summary.json").read_text())  # same machine: the job wrote here
    assert summary["steps"] == 6 and summary["method"] == "lora"


def test_submit_rejects_a_bad_recipe_before_contacting_the_cluster(tmp_path):
    result = run_llmc("submit", "--address", "http://127.0.0.1:9", "--",
                      "finetune", "workloads/configs/tiny-lora.yaml", "--set", "train.method=sft")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "train.method" in result.stderr and "lora" in result.stderr
    assert "submitted" not in result.stdout
