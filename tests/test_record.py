"""MLflow as the system of record, on a real SQLite store: what a command leaves as a run (params, metrics,
artifacts, lineage tags), the registry's model versions with their lineage, a store that cannot be used, and
`mlflow ui` showing a run and a model version page in a headless Chromium (screenshots under runs/test-output/)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_llmc
from workloads.common import record, registry
from workloads.common.paths import resolve_files
from workloads.common.recipe import RecipeError
from workloads.kinds import KINDS, load_recipe
from workloads.prompting.templates import load_library
from workloads.serve.objectstore import free_port

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "runs" / "test-output" / "mlflow-ui"
# Debian's chromium, driven by Playwright: no browser download, nothing reached beyond loopback.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_of(uri: str, out: Path):
    """The one run recorded for the output directory `out`."""
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`llmc.output_dir` = '{out.resolve()}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_a_command_with_results_leaves_a_run_and_a_failed_one_is_marked(tmp_path, monkeypatch):
    """An eval's output directory, recorded: recipe params, summary numbers, the variants table by name, a step
    table as a series, files as artifacts, weights by path, a prompt version registered during the run linked to
    it; an exception inside marks the run FAILED."""
    monkeypatch.setenv(record.SWITCH_ENV, "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe(REPO / "workloads/configs/tiny-eval.yaml", ["endpoint.base_url=http://127.0.0.1:9/v1"],
                         kind="eval")
    out = tmp_path / "runs" / "eval"
    (out / "model").mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"cases": 50, "best": 0.25, "ok": True, "name": "x"}))
    (out / "variants.csv").write_text("variant,accuracy,failures\nbase|t=0,0.25,0\nadapter,0.75,1\n")
    (out / "curve.csv").write_text("step,loss,eval_loss\n1,2.0,\n2,1.5,1.25\n")
    entry = next(p for p in load_library().prompts if p.kind == "few_shot")
    with record.recording("eval", recipe, out) as run:
        assert record.current() is run
        prompt = registry.register_prompt(run.uri, entry, REPO / "workloads/prompting/library.yaml", run)
        run.finish(json.loads((out / "summary.json").read_text()))
    uri = record.tracking_uri(out.parent)
    assert uri == f"sqlite:///{out.parent.resolve()}/mlflow.db" and (out.parent / "mlflow.db").is_file()
    found, client = _run_of(uri, out), _client(uri)
    assert found.info.status == "FINISHED" and found.info.run_name == "eval"
    params = found.data.params
    assert params["test_set.path"] == "workloads/bundled/arithmetic_test.jsonl"
    assert json.loads(params["variants"])[0]["name"] == "base"
    metrics = found.data.metrics
    assert metrics["cases"] == 50 and metrics["best"] == 0.25 and "ok" not in metrics
    assert metrics["base_t_0/accuracy"] == 0.25 and metrics["adapter/accuracy"] == 0.75
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "train/loss")] == [(1, 2.0),
                                                                                                      (2, 1.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "eval/loss")] == [(2, 1.25)]
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {"summary.json", "variants.csv",
                                                                         "curve.csv"}
    tags = found.data.tags
    assert tags["llmc.kind"] == "eval" and tags["llmc.path.model"] == str((out / "model").resolve())
    assert tags["llmc.base_model"] == "tiny at http://127.0.0.1:9/v1" and "llmc.base_model_digest" not in tags
    resolved = json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode()
    assert tags["llmc.recipe_hash"] == hashlib.sha256(resolved).hexdigest()
    expected = record.data_digest({"path": "workloads/bundled/arithmetic_test.jsonl"})
    assert tags["llmc.data_digest"] == expected and len(resolve_files("workloads/bundled/arithmetic_test.jsonl")) == 1
    assert prompt.tags["llmc.ref"] == entry.ref and prompt.tags["llmc.run_id"] == found.info.run_id
    assert json.loads(tags["mlflow.linkedPrompts"]) == [{"name": entry.name, "version": str(prompt.version)}]
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["llmc.git_commit"] == tags["mlflow.source.git.commit"] == git

    failed = tmp_path / "runs" / "failed"
    with pytest.raises(RuntimeError, match="boom"), record.recording("eval", recipe, failed):
        raise RuntimeError("boom")
    assert _run_of(uri, failed).info.status == "FAILED"
    monkeypatch.setenv(record.SWITCH_ENV, "off")
    with record.recording("eval", recipe, tmp_path / "runs" / "off") as off:
        assert off is None and record.current() is None


def test_a_run_registers_its_adapter_as_a_candidate_child_of_the_version_it_started_from(tmp_path, monkeypatch):
    """`run.register_as`: each finished run's adapter becomes the next version (alias candidate), its parent the
    version registered from the adapter the run started from; an adapter from elsewhere has no parent."""
    monkeypatch.setenv(record.SWITCH_ENV, "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe(REPO / "workloads/configs/tiny-lora.yaml")
    made = {}
    for name, start in (("sft", None), ("dpo", "sft"), ("other", str(tmp_path / "elsewhere"))):
        out = tmp_path / "runs" / name
        (out / "adapter").mkdir(parents=True)
        (out / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "run": name}))
        summary = {"artifact": str(out / "adapter"), "start_adapter": made.get(start, start)}
        with record.recording("finetune", recipe, out) as run:
            run.finish(summary)
            made[name] = summary["artifact"]
            assert registry.register_output(run, "tiny-arith", summary) == f"tiny-arith@{len(made)}"
            run_id = run.run_id
    uri = record.tracking_uri(tmp_path / "runs")
    assert [str(v.version) for v in registry.lineage(uri, "tiny-arith", 2)] == ["2", "1"]
    assert [str(v.version) for v in registry.lineage(uri, "tiny-arith", 3)] == ["3"]
    third = registry.version(uri, "tiny-arith", 3)
    assert third.tags["llmc.run_id"] == run_id and third.tags[registry.ARTIFACT_PATH] == made["other"]
    assert str(registry.candidate(uri, "tiny-arith").version) == "3" and registry.champion(uri, "tiny-arith") is None
    with tempfile.TemporaryDirectory() as into:  # the registered files are the run's logged adapter
        config = json.loads((registry.download(uri, third, into) / "adapter_config.json").read_text())
    assert config["run"] == "other"
    with pytest.raises(ValueError, match="field 'run.register_as': the run wrote no artifact"):
        registry.register_output(run, "tiny-arith", {"artifact": None})


def test_registering_without_the_record_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv(record.SWITCH_ENV, "off")
    recipe = load_recipe(REPO / "workloads/configs/tiny-lora.yaml", ["run.register_as=tiny-arith"])
    with pytest.raises(RecipeError, match="field 'run.register_as': registering 'tiny-arith' needs the MLflow record"):
        KINDS["finetune"].run(recipe, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_tracking_store_that_cannot_be_used_fails_before_any_work(tmp_path):
    """A URI MLflow has no store for, and a server that does not answer: one clear line naming the URI and where it
    came from, exit 1, nothing started (no output directory)."""
    out = tmp_path / "eval"
    result = run_llmc("eval", "workloads/configs/tiny-eval.yaml", "--output-dir", str(out),
                      env={"MLFLOW_TRACKING_URI": "bogus://nowhere", record.SWITCH_ENV: "on"}, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "TrackingStoreError: MLflow tracking store 'bogus://nowhere' (MLFLOW_TRACKING_URI) cannot be used" in (
        result.stderr), result.stderr
    assert "starting" not in result.stdout and not out.exists()
    port = free_port()
    started = time.monotonic()
    with pytest.raises(record.TrackingStoreError, match=f"'http://127.0.0.1:{port}' .*ConnectionError"):
        record.check_store(f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 15  # one probe, not MLflow's minutes of retries


@pytest.fixture(scope="module")
def recorded(lora_run) -> dict:
    """`lora_run`'s MLflow run (the SQLite store beside its run directory) and its adapter registered twice: v1
    from the base, v2 with v1 as its parent; candidate -> v2, champion -> v1."""
    uri = record.tracking_uri(lora_run["out"].parent)
    found = _run_of(uri, lora_run["out"])
    run_id = found.info.run_id
    first = registry.register_adapter(uri, "tiny-arith", run_id)
    second = registry.register_adapter(uri, "tiny-arith", run_id, parent=f"tiny-arith/{first.version}")
    registry.set_alias(uri, "tiny-arith", registry.CANDIDATE, second.version)
    registry.set_alias(uri, "tiny-arith", registry.CHAMPION, first.version)
    return {"uri": uri, "run": found, "first": first, "second": second}


@pytest.mark.slow
def test_finetune_run_holds_its_recipe_metrics_outputs_and_lineage(lora_run, recorded):
    """The run `llmc finetune` left (its workers restarted once, still one run): the resolved recipe with the
    overrides, every step's loss, the summary's numbers, the adapter and tables as artifacts, lineage tags."""
    found, client, summary = recorded["run"], _client(recorded["uri"]), lora_run["summary"]
    assert found.info.status == "FINISHED"
    params = found.data.params
    assert params["train.max_steps"] == "30" and params["train.optimizer"] == "adamw_8bit"
    assert params["model.name"] == "tiny" and params["kind"] == "finetune"
    losses = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, lora_run["steps"] + 1))
    assert found.data.metrics["final_eval_loss"] == pytest.approx(summary["final_eval_loss"])
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"adapter", "summary.json", "metrics.csv", "loss_curve.png", "recipe.yaml"} <= artifacts
    assert "checkpoints" not in artifacts and "merged" not in artifacts  # by path: Ray storage and full weights
    assert {a.path for a in client.list_artifacts(found.info.run_id, "adapter")} >= {"adapter/adapter_config.json"}
    tags = found.data.tags
    assert tags["llmc.path.merged"] == summary["merged"]
    assert tags["llmc.base_model_digest"] == record.model_digest(summary["base_model_path"])
    resolved = record.resolved_recipe(load_recipe(lora_run["out"] / "recipe.yaml", kind="finetune"))
    assert tags["llmc.data_digest"] == record.data_digest(resolved)


@pytest.mark.slow
def test_registered_adapter_leads_to_its_run_data_and_parent(recorded, tmp_path):
    """A model version's tags lead back to the run that made it, its data digest and its parent; its source is the
    run's logged adapter; the aliases name candidate and champion."""
    uri, found, first, second = recorded["uri"], recorded["run"], recorded["first"], recorded["second"]
    client = _client(uri)
    assert second.tags["llmc.parent"] == f"tiny-arith/{first.version}" and "llmc.parent" not in first.tags
    made_by = client.get_run(second.tags["llmc.run_id"])
    assert made_by.info.run_id == second.run_id == found.info.run_id
    assert second.tags["llmc.data_digest"] == made_by.data.tags["llmc.data_digest"]
    assert second.tags["llmc.recipe_hash"] == made_by.data.tags["llmc.recipe_hash"]
    assert float(second.tags["llmc.score.final_eval_loss"]) == pytest.approx(made_by.data.metrics["final_eval_loss"])
    assert [v.version for v in registry.lineage(uri, "tiny-arith", second.version)] == [second.version, first.version]
    assert registry.champion(uri, "tiny-arith").version == first.version
    assert registry.candidate(uri, "tiny-arith").version == second.version
    from mlflow.artifacts import download_artifacts

    adapter = Path(download_artifacts(artifact_uri=second.source, dst_path=str(tmp_path)))
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    with pytest.raises(Exception, match="tiny-arith"):  # a parent that does not exist is refused
        registry.register_adapter(uri, "tiny-arith", found.info.run_id, parent="tiny-arith/99")


@pytest.mark.slow
def test_mlflow_ui_shows_the_run_the_model_version_and_a_prompt(recorded, tmp_path):
    """`mlflow ui` on loopback over the store: a headless Chromium finds the run's page with its lineage tags, the
    model version page with its parent, and a prompt version; screenshots of each are kept."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian's chromium: `make test` installs it with apt-get as root)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    uri, found, second = recorded["uri"], recorded["run"], recorded["second"]
    library = load_library()
    entry = next(p for p in library.prompts if p.kind == "few_shot")
    registry.register_prompt(uri, entry, REPO / "workloads/prompting/library.yaml")
    port = free_port()
    ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
                           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                          stdout=(tmp_path / "ui.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    base = f"http://127.0.0.1:{port}"
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    try:
        _wait_for_health(base, ui, tmp_path / "ui.log")
        experiment, run_id = found.info.experiment_id, found.info.run_id
        pages = {"runs": (f"#/experiments/{experiment}/runs", f'a[href*="/runs/{run_id}"]'),  # the run's link
                 "run": (f"#/experiments/{experiment}/runs/{run_id}", "text=llmc.data_digest"),
                 "model-version": (f"#/models/tiny-arith/versions/{second.version}", "text=llmc.parent"),
                 "prompt": (f"#/prompts/{entry.name}", f"text={entry.ref}")}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name, (path, selector) in pages.items():
                page.goto(f"{base}/{path}", wait_until="load")
                page.locator(selector).first.wait_for(timeout=60_000)
                page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
    assert sorted(p.name for p in SCREENSHOTS.iterdir()) == ["model-version.png", "prompt.png", "run.png", "runs.png"]
    print(f"screenshots in {SCREENSHOTS}")


def _wait_for_health(base: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(f"{base}/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow ui did not answer in {timeout} s: {log.read_text()[-3000:]}")
