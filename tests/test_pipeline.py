"""`llmc pipeline` (kind: pipeline): broken pipelines exit 2 naming the field before any work; stage keys change with
a stage's data and its upstream artifacts and nothing else; and the tiny pipeline on the session's Ray cluster: run end
to end (each stage a nested MLflow run), rerun with nothing run, a missed gate exiting 1, and a change of the SFT data
rerunning SFT and DPO but not the reward model before them."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_llmc
from workloads.common import registry
from workloads.common.recipe import RecipeError
from workloads.common.record import resolved_recipe
from workloads.kinds import KINDS, load_recipe
from workloads.pipeline import gates, outputs, stages
from workloads.pipeline.recipe import GateConfig
from workloads.pipeline.run import check_start
from workloads.pipeline.state import PipelineState, forced_stages, stage_key

TINY = REPO / "workloads/configs/tiny-pipeline.yaml"
SMOLLM2 = REPO / "workloads/configs/smollm2-pipeline.yaml"
ARITHMETIC = REPO / "workloads/bundled/arithmetic_train.jsonl"


def _pipeline(tmp_path: Path, name: str = "pipeline.yaml", edit=None, sft_data: Path | None = None) -> Path:
    """A copy of the tiny pipeline, its SFT stage reading `sft_data` when given, changed by `edit(raw)`."""
    raw = yaml.safe_load(TINY.read_text())
    if sft_data is not None:
        raw["stages"][1]["set"].append(f"data.path={sft_data}")
    if edit is not None:
        edit(raw)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_shipped_pipelines_name_their_stages_and_what_they_read():
    smollm2 = KINDS["pipeline"].plan(load_recipe(SMOLLM2))["stages"]
    assert [(s["name"], s["kind"]) for s in smollm2] == [
        ("baseline", "eval"), ("prompt_search", "prompt_search"), ("sft", "finetune"), ("grpo", "align"),
        ("promote", "promote")]
    assert smollm2[3]["reads"] == ["sft"] and smollm2[3]["gates"] == [{"metric": "final_mean_reward", "min": 0.3}]
    assert smollm2[4]["reads"] == ["grpo"]
    tiny = KINDS["pipeline"].plan(load_recipe(TINY))["stages"]
    assert [(s["name"], s["kind"], s["reads"]) for s in tiny] == [
        ("reward", "align", []), ("sft", "finetune", []), ("dpo", "align", ["sft"])]


def _appended() -> dict[str, int]:
    """The index an item appended to each stage's `set` gets in the shipped tiny pipeline."""
    return {stage["name"]: len(stage.get("set", [])) for stage in yaml.safe_load(TINY.read_text())["stages"]}


def _set(index: int, *items: str):
    return lambda raw: raw["stages"][index]["set"].extend(items)


def _gate(index: int, metric: str):
    return lambda raw: raw["stages"][index].setdefault("gates", []).append({"metric": metric, "min": 0})


@pytest.mark.parametrize(("edit", "field", "said"), [
    (_set(2, "rl.adapter=${stages.eval.outputs.artifact}"), "stages.2.set.{dpo}", "stage 'eval', which does not exist"),
    (_set(1, "data.path=${stages.dpo.outputs.artifact}"), "stages.1.set.{sft}", "a reference to this or a later stage "
     "is a cycle"),
    (_set(2, "run.name=${stages.sft.outputs.adapter}"), "stages.2.set.{dpo}", "stage 'sft' writes no output 'adapter'"),
    (_set(2, "dpo.adapter=${stage.sft.artifact}"), "stages.2.set", "is not a reference"),
    (_gate(1, "best_accuracy"), "stages.1.gates.1.metric", "stage 'sft' (finetune) writes no 'best_accuracy'"),
    (_gate(0, "final_reward_accuracy"), "stages.0.gates.0.metric", "writes no 'final_reward_accuracy'"),
    (_set(1, "train.max_steps=many"), "stages.1.recipe.train.max_steps", "valid integer"),
    (lambda raw: raw["stages"][0].update(recipe="workloads/configs/serve-tiny.yaml"), "stages.0.recipe",
     "kind 'serve' cannot be a stage"),
    (lambda raw: raw["stages"][2].update(name="sft"), "stages.2.name", "used twice"),
    (lambda raw: raw["stages"][2].update(set=[], recipe={**yaml.safe_load((REPO / "workloads/configs/tiny-dpo.yaml")
     .read_text()), "dpo": {"adapter": "${stages.base.outputs.artifact}"}}), "stages.2.recipe.dpo.adapter",
     "stage 'base', which does not exist"),
    (lambda raw: raw["stages"][1].update(gates=[{"metric": "final_eval_loss"}]), "stages.1.gates.0",
     "give min, max or both"),
    (lambda raw: raw["stages"].append({"name": "promote", "recipe": {
        "kind": "promote", "version": "${stages.reward.outputs.registered_version}"}}), "stages.3.recipe.version",
     "stage 'reward' writes no output 'registered_version'"),  # the reward stage registers nothing
    (lambda raw: raw["stages"].append({"name": "promote", "recipe": {"kind": "promote", "version": "tiny-arith"}}),
     "stages.3.recipe.version", "should match pattern"),
])
def test_a_broken_pipeline_names_the_field(tmp_path, edit, field, said):
    field = field.format(**_appended())
    with pytest.raises(RecipeError) as info:
        load_recipe(_pipeline(tmp_path, edit=edit))
    assert f"field '{field}'" in str(info.value) and said in str(info.value), str(info.value)


def test_a_broken_pipeline_exits_2_before_any_work(tmp_path):
    out = tmp_path / "run"
    cycle = _pipeline(tmp_path, edit=_set(1, "data.path=${stages.dpo.outputs.artifact}"))
    for args in ([str(cycle)], [str(TINY), "--from", "grpo"]):
        result = run_llmc("pipeline", *args, "--output-dir", str(out), timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        named = f"field 'stages.1.set.{_appended()['sft']}'" if args[0] != str(TINY) else "field '--from'"
        assert named in result.stderr, result.stderr
        assert "Ray" not in result.stdout + result.stderr and not out.exists()


def test_a_promote_stage_needs_the_cluster_serving_the_endpoint_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    recipe = load_recipe(_pipeline(tmp_path, edit=lambda raw: raw["stages"].append({"name": "promote", "recipe": {
        "kind": "promote", "version": "${stages.dpo.outputs.registered_version}"}})))
    with pytest.raises(RecipeError, match="field 'stages.3.recipe.address': stage 'promote' promotes on a running "
                       "endpoint"):
        check_start(recipe, None)
    check_start(recipe, None, "127.0.0.1:6379")  # --address
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    check_start(recipe, None)


def test_from_names_a_stage_and_forces_it_and_those_after_it():
    recipe = load_recipe(TINY)
    check_start(recipe, "sft")
    assert forced_stages(recipe.stage_names(), "sft") == {"sft", "dpo"}
    assert forced_stages(recipe.stage_names(), None) == set()
    with pytest.raises(RecipeError, match="field '--from': got 'eval'; stages: reward, sft, dpo"):
        check_start(recipe, "eval")


def test_a_stage_key_changes_with_its_data_and_upstream_artifacts_only(tmp_path):
    data = tmp_path / "sft.jsonl"
    shutil.copy(ARITHMETIC, data)
    reward, sft, dpo = load_recipe(_pipeline(tmp_path, sft_data=data)).stages
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    upstream = {"sft": {"artifact": str(adapter), outputs.OUTPUT_DIR: str(tmp_path)}}

    def keys() -> list[str]:
        return [stage_key(resolved_recipe(stages.load(s, upstream)),
                          [ref for _, ref in stages.found_references(s)], upstream) for s in (reward, sft, dpo)]

    before = keys()
    assert keys() == before  # nothing changed: every key the same
    with data.open("a") as handle:
        handle.write(ARITHMETIC.read_text().splitlines()[0] + "\n")
    after_data = keys()
    assert after_data[0] == before[0] and after_data[1] != before[1] and after_data[2] == before[2]
    (adapter / "adapter_model.safetensors").write_bytes(b"new weights")
    after_adapter = keys()
    assert after_adapter[:2] == after_data[:2] and after_adapter[2] != after_data[2]

    state = PipelineState(tmp_path / "state.json")
    assert not state.unchanged("sft", before[1])
    state.finished("sft", before[1], {"final_eval_loss": 1.0, outputs.OUTPUT_DIR: str(tmp_path)})
    again = PipelineState(tmp_path / "state.json")
    assert again.unchanged("sft", before[1]) and not again.unchanged("sft", after_data[1])
    assert again.outputs("sft")["final_eval_loss"] == 1.0


def test_a_gate_names_the_stage_metric_value_and_bar():
    bars = [GateConfig(metric="final_eval_loss", max=2.0), GateConfig(metric="final_eval_exact_match", min=0.5)]
    assert gates.check("sft", bars, {"final_eval_loss": 1.5, "final_eval_exact_match": 0.75}) == [
        "final_eval_loss 1.5 <= 2.0", "final_eval_exact_match 0.75 >= 0.5"]
    with pytest.raises(gates.GateFailed, match=r"stage 'sft' failed its gate: final_eval_exact_match = 0.25, the bar "
                       r"is final_eval_exact_match >= 0.5"):
        gates.check("sft", bars, {"final_eval_loss": 1.5, "final_eval_exact_match": 0.25})
    with pytest.raises(gates.GateFailed, match="final_eval_loss = None"):  # a run that measured nothing fails
        gates.check("sft", bars, {"final_eval_loss": None})


def test_the_rl_summary_keys_follow_the_rl_phases():
    from workloads.align.rl import PHASES

    rl = outputs.summary_keys({"kind": "align", "method": "grpo"}, KINDS["align"].schema)
    assert {key for key in rl if key.startswith("total_")} == {f"total_{phase}" for phase in PHASES}


@pytest.fixture(scope="module")
def tiny_pipeline(ray_cluster, tmp_path_factory) -> dict:
    """The tiny pipeline on the session's cluster, recorded in MLflow (`root`/mlflow.db), with its SFT data a copy:
    run, rerun unchanged, rerun with a bar the SFT stage misses, then rerun after a line is added to the SFT data."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "sft.jsonl"
    shutil.copy(ARITHMETIC, data)
    recipe = _pipeline(root, sft_data=data)
    strict = _pipeline(root, "strict.yaml", edit=lambda raw: raw["stages"][1].update(
        gates=[{"metric": "final_eval_loss", "max": 0.001}]), sft_data=data)
    out, env = root / "run", {"LLMC_MLFLOW": "on", "MLFLOW_TRACKING_URI": ""}
    started = time.monotonic()
    first = run_llmc("pipeline", str(recipe), "--output-dir", str(out), env=env, timeout=900)
    print(f"tiny pipeline: first run {time.monotonic() - started:.0f} s")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    summaries = {name: json.loads((out / name / "summary.json").read_text()) for name in ("reward", "sft", "dpo")}
    state = json.loads((out / "pipeline_state.json").read_text())
    rerun = time.monotonic()
    unchanged = run_llmc("pipeline", str(recipe), "--output-dir", str(out), env=env, timeout=300)
    gated = run_llmc("pipeline", str(strict), "--output-dir", str(out), env=env, timeout=300)
    with data.open("a") as handle:
        handle.write(ARITHMETIC.read_text().splitlines()[0] + "\n")
    started = time.monotonic()
    changed = run_llmc("pipeline", str(recipe), "--output-dir", str(out), env=env, timeout=900)
    print(f"tiny pipeline: reruns {started - rerun:.0f} s, after the data change {time.monotonic() - started:.0f} s")
    return {"root": root, "out": out, "first": first, "summaries": summaries, "state": state,
            "unchanged": unchanged, "gated": gated, "changed": changed}


@pytest.mark.slow
def test_the_tiny_pipeline_runs_each_stage_as_a_nested_mlflow_run(tiny_pipeline):
    from mlflow.tracking import MlflowClient

    out, summaries = tiny_pipeline["out"], tiny_pipeline["summaries"]
    for stage in ("reward", "sft", "dpo"):
        assert f"[llmc] {stage}: running" in tiny_pipeline["first"].stdout
        kind = tiny_pipeline["state"]["stages"][stage]["outputs"]
        raw = yaml.safe_load((out / stage / "recipe.yaml").read_text())
        assert set(summaries[stage]) == outputs.summary_keys(raw, KINDS[raw["kind"]].schema)  # the table is right
        assert kind[outputs.OUTPUT_DIR] == str(out / stage) and kind["artifact"] == summaries[stage]["artifact"]
    dpo = yaml.safe_load((out / "dpo" / "recipe.yaml").read_text())
    assert dpo["dpo"]["adapter"] == summaries["sft"]["artifact"] == str(out / "sft" / "adapter")
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_pipeline['root'] / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`llmc.output_dir` = '{out.resolve()}'")
    pipeline = min(runs, key=lambda r: r.info.start_time)  # the first of the pipeline's four runs
    assert pipeline.data.tags["llmc.kind"] == "pipeline"
    nested = client.search_runs([pipeline.info.experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}'")
    assert sorted(r.info.run_name for r in nested) == ["dpo", "reward", "sft"]
    assert {r.info.status for r in nested} == {"FINISHED"}
    assert pipeline.data.tags["llmc.path.sft"] == str(out / "sft")  # the stage's files are its own run's
    # Lineage: SFT's adapter is version 1 of tiny-pipeline-arith, DPO's (started from it) version 2, its child.
    uri = f"sqlite:///{tiny_pipeline['root'] / 'mlflow.db'}"
    assert [summaries[s]["registered_version"] for s in ("sft", "dpo")] == ["tiny-pipeline-arith@1",
                                                                            "tiny-pipeline-arith@2"]
    assert "registered_version" not in summaries["reward"]
    chain = registry.lineage(uri, "tiny-pipeline-arith", 2)
    assert [str(v.version) for v in chain] == ["2", "1"]
    runs_by_name = {r.info.run_name: r.info.run_id for r in nested}
    assert [v.tags["llmc.run_id"] for v in chain] == [runs_by_name["dpo"], runs_by_name["sft"]]
    assert chain[0].tags[registry.ARTIFACT_PATH] == summaries["dpo"]["artifact"]


@pytest.mark.slow
def test_a_rerun_with_nothing_changed_runs_no_stage(tiny_pipeline):
    result = tiny_pipeline["unchanged"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for stage in ("reward", "sft", "dpo"):
        assert f"[llmc] {stage}: unchanged, skipped" in result.stdout
    assert "running" not in result.stdout


@pytest.mark.slow
def test_a_missed_gate_exits_1_naming_the_metric_value_and_bar(tiny_pipeline):
    result, loss = tiny_pipeline["gated"], tiny_pipeline["summaries"]["sft"]["final_eval_loss"]
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    assert (f"stage 'sft' failed its gate: final_eval_loss = {loss!r}, the bar is final_eval_loss <= 0.001"
            in result.stderr), result.stderr
    assert "[llmc] sft: unchanged, skipped" in result.stdout and "dpo" not in result.stdout  # stopped after sft


@pytest.mark.slow
def test_new_sft_data_reruns_sft_and_what_follows_not_the_stage_before(tiny_pipeline):
    result = tiny_pipeline["changed"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "[llmc] reward: unchanged, skipped" in result.stdout
    assert "[llmc] sft: running finetune" in result.stdout and "[llmc] dpo: running align" in result.stdout
    state = json.loads((tiny_pipeline["out"] / "pipeline_state.json").read_text())["stages"]
    assert state["reward"]["key"] == tiny_pipeline["state"]["stages"]["reward"]["key"]
    assert all(state[s]["key"] != tiny_pipeline["state"]["stages"][s]["key"] for s in ("sft", "dpo"))
    # Only the stages that ran registered: SFT and DPO again (versions 3 and 4), none of the skipping reruns.
    uri = f"sqlite:///{tiny_pipeline['root'] / 'mlflow.db'}"
    assert [str(v.version) for v in registry.lineage(uri, "tiny-pipeline-arith", 4)] == ["4", "3"]
    assert str(registry.candidate(uri, "tiny-pipeline-arith").version) == "4"
