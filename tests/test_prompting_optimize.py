"""The prompt optimizer (`llmc optimize`): recipe errors before any request, the proposer's reply parsed, candidates
built and saved with their lineage, and the whole loop end to end against the session's served tiny model
(tests/conftest.py `server`)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import REPO, run_llmc
from workloads.common import record
from workloads.common.recipe import RecipeError
from workloads.kinds import validate_recipe
from workloads.prompting.optimizer import (
    AS_IS,
    Trace,
    build_candidates,
    check_recipe,
    parse_rewrites,
    phrasings,
    save_best,
)
from workloads.prompting.templates import DEFAULT_LIBRARY, load_library

RECIPE = REPO / "workloads/configs/tiny-optimize.yaml"


def _recipe(**changes):
    raw = yaml.safe_load(RECIPE.read_text()) | changes
    return validate_recipe(raw, kind="optimize", source=RECIPE.name)


def _traces(n: int) -> list[Trace]:
    rows = [json.loads(line) for line in (REPO / "workloads/bundled/arithmetic_train.jsonl").open()][:n]
    return [Trace(row, row["output"]) for row in rows]


# --------------------------------------------------------------------------------------------- fast: no server


@pytest.mark.parametrize("changes, field, allowed", [
    ({"k": [0, 8]}, "k", "more than max_demos (4)"),
    ({"max_demos": 0}, "max_demos", "greater than or equal to 1"),
    ({"proposer": {"model": "tiny", "n": 0}}, "proposer.n", "greater than or equal to 1"),
    ({"proposer": {"meta_prompt": "Rewrite {text}"}}, "proposer.meta_prompt", "uses {instruction}"),
    ({"proposer": {"endpoint": {"model": "gpt"}}}, "proposer", "proposer.endpoint.base_url: required"),
    ({"teacher": {"prompt": "arithmetic-question", "modle": "tiny"}}, "teacher.modle", "unknown field"),
    ({"instruction_candidates": ["arithmetic-question"] * 2}, "instruction_candidates", "each entry once"),
    ({"library": "no/such.yaml"}, "library", "file not found"),
    ({"dev_set": {"path": "no/such.jsonl"}}, "dev_set", "file not found"),
])
def test_schema_errors_name_the_field_and_what_is_allowed(changes, field, allowed):
    with pytest.raises(RecipeError) as err:
        _recipe(**changes)
    assert f"field '{field}'" in str(err.value) and allowed in str(err.value), str(err.value)


@pytest.mark.parametrize("changes, field, allowed", [
    ({"target": "nope"}, "target", "arithmetic-bundled, arithmetic-compute"),
    ({"target": "arithmetic-question"}, "target", "is kind zero_shot; the target is a few_shot entry"),
    ({"target": "arithmetic-few-shot@7"}, "target", "no version '7'"),
    ({"teacher": {"prompt": "nope"}}, "teacher.prompt", "'nope' is not in the library"),
    ({"instruction_candidates": ["arithmetic-question", "nope"]}, "instruction_candidates.1", "not in the library"),
    ({"target": "arithmetic-few-shot-bare"}, "proposer", "no instruction to rewrite"),
    ({"train_set": {"path": "workloads/bundled/arithmetic_train.jsonl", "reference_field": "answer"}},
     "train_set.reference_field", "has no 'answer' field"),
    ({"dev_set": {"path": "workloads/bundled/arithmetic_test.jsonl", "fields": {"input": "question"}}},
     "dev_set.fields", "no field 'question'"),
])
def test_library_errors_are_found_before_any_request(changes, field, allowed):
    with pytest.raises(RecipeError) as err:
        check_recipe(_recipe(**changes))
    assert f"field '{field}'" in str(err.value) and allowed in str(err.value), str(err.value)


def test_a_bad_recipe_exits_2_from_the_command_before_any_request(tmp_path):
    result = run_llmc("optimize", str(RECIPE), "--output-dir", str(tmp_path / "out"),
                      "--set", "endpoint.base_url=http://127.0.0.1:9/v1", "--set", "target=arithmetic-cot")
    assert result.returncode == 2, result.stderr
    assert "field 'target'" in result.stderr and "few_shot" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_proposer_replies_are_parsed_one_rewrite_per_line():
    reply = ('1. Add the numbers.\n\n  - "Sum the two numbers."\nRewrite 3: add THE numbers. \n* \n...\n'
             "Instruction: Add the two numbers and state the sum in a sentence.\n2) Total them.\nExtra line")
    original = "Add the two numbers and state the sum in a sentence."
    assert parse_rewrites(reply, 3, exclude=[original]) == ["Add the numbers.", "Sum the two numbers.",
                                                            "Total them."]
    assert parse_rewrites(reply, 10, exclude=[original])[-1] == "Extra line"
    assert parse_rewrites("", 3) == [] and parse_rewrites(". \n--\n", 3) == []


def test_candidates_are_every_phrasing_times_k_with_the_demonstrations_rendered_in_each():
    recipe = _recipe()
    library = load_library()
    target = library.get("arithmetic-few-shot")
    found = phrasings(recipe, library, target, ["Sum {them} up.", "Add the two numbers and state the sum in a "
                                                                  "sentence.", "Add {input} up."])
    # the last rewrite equals the target's own instruction: a repeat, dropped
    assert [p.source for p in found] == ["arithmetic-few-shot@1", "arithmetic-question@1",
                                         "arithmetic-short-instruction@1", "arithmetic-styled-instruction@1",
                                         "rewrite 1", "rewrite 3"]
    candidates = build_candidates(target, found, _traces(3), recipe.k, recipe.train_set)
    assert candidates[0].name == AS_IS and candidates[0].template.demonstrations == target.demonstrations
    assert len(candidates) == 1 + len(found) * 3  # k 0, 2 and 4 -> 0, 2, 3 (three demonstrations)
    assert {c.template.k for c in candidates[1:]} == {0, 2, 3}
    own = next(c for c in candidates if c.name.endswith("arithmetic-question-k2"))
    messages = own.template.render_messages({"input": "1 + 2"})
    assert [m["content"] for m in messages] == ["What is 49 + 97?", "The sum of 49 and 97 is 146.",
                                                "What is 53 + 5?", "The sum of 53 and 5 is 58.", "What is 1 + 2?"]
    junk = next(c for c in candidates if c.name.endswith("rewrite1-k0"))
    assert junk.template.render_messages({"input": "1 + 2"})[0]["content"] == "Sum {them} up.\n\n1 + 2"
    kept = next(c for c in candidates if c.name.endswith("rewrite3-k0"))  # a variable of the target stays one
    assert kept.template.render_messages({"input": "1 + 2"})[0]["content"] == "Add 1 + 2 up.\n\n1 + 2"


def test_the_best_is_saved_as_a_new_version_with_score_and_lineage_and_the_shipped_library_is_untouched(tmp_path):
    shipped = DEFAULT_LIBRARY.read_bytes()
    recipe = _recipe(save_to=str(tmp_path / "mine.yaml"))
    library = load_library()
    target = library.get("arithmetic-few-shot")
    candidates = build_candidates(target, phrasings(recipe, library, target), _traces(4), [2], recipe.train_set)
    best = next(c for c in candidates if c.name.endswith("arithmetic-question-k2"))
    details = {"teacher": "arithmetic-question@1 on tiny", "demos_kept": 4, "candidates_tried": 4}
    saved, path = save_best(recipe, tmp_path, target, best, 0.9, "arithmetic-question@1", details)
    again, _ = save_best(recipe, tmp_path, target, best, 0.8, "arithmetic-question@1", details)
    assert path == tmp_path / "mine.yaml"
    assert (saved.ref, again.ref) == ("arithmetic-few-shot@2", "arithmetic-few-shot@3")
    reloaded = load_library(path)
    assert reloaded.versions("arithmetic-few-shot") == [1, 2, 3] and reloaded.names() == library.names()
    entry = reloaded.get("arithmetic-few-shot@2")
    assert entry.score == 0.9 and entry.k == 2 and len(entry.demonstrations) == 4 and entry.kind == "few_shot"
    assert entry.lineage.parents == ["arithmetic-few-shot@1", "arithmetic-question@1"]
    assert entry.lineage.method == "bootstrap_few_shot" and entry.lineage.details == details
    assert entry.render_messages({"input": "1 + 2"})[-1]["content"] == "What is 1 + 2?"
    assert reloaded.get("arithmetic-few-shot@1") == target  # the parent kept as it was
    assert path.read_text().startswith("# The bundled prompt library")  # the header comment kept
    assert DEFAULT_LIBRARY.read_bytes() == shipped


# --------------------------------------------------------------------------------------------- the served model


def test_llmc_optimize_against_the_server_beats_the_unoptimized_target_and_saves_it(server, tmp_path):
    """The base model cannot read the target's bundled phrasing (0 on dev); the optimizer finds one it can and
    saves it, with its score and lineage, in the output directory's copy of the library, and in MLflow's prompt
    registry (the SQLite store beside the output directory) linked to the command's run."""
    out = tmp_path / "optimize"
    shipped = DEFAULT_LIBRARY.read_bytes()
    result = run_llmc("optimize", str(RECIPE), "--output-dir", str(out),
                      "--set", f"endpoint.base_url={server.base}/v1", "--set", "endpoint.api_key_env=LLMC_OPT_KEY",
                      "--set", "k=[0,2]", "--set", "proposer.n=2",
                      "--set", "instruction_candidates=[arithmetic-question,arithmetic-short-instruction]",
                      env={"LLMC_OPT_KEY": server.key, "LLMC_CACHE": str(tmp_path / "cache"), "LLMC_MLFLOW": "on",
                           "MLFLOW_TRACKING_URI": ""}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_dev_accuracy"] >= summary["baseline_dev_accuracy"] + 0.5, summary["candidates"]
    assert summary["dev_cases"] == 30 and 0 < summary["demos_kept"] <= 4 and summary["failures"] == 0
    assert summary["candidates_tried"] == len(summary["candidates"]) - 1 >= 6
    for demo in summary["demonstrations"]:  # kept because they scored: the teacher's answers end in the sum
        a, b = map(int, demo["case"]["input"].split(" + "))
        assert re.findall(r"\d+", demo["answer"])[-1] == str(a + b), demo
    library = load_library(out / "library.yaml")
    saved = library.get("arithmetic-few-shot")
    assert saved.ref == summary["best_saved_as"] == "arithmetic-few-shot@2"
    assert saved.score == summary["best_dev_accuracy"] and saved.lineage.method == "bootstrap_few_shot"
    assert saved.lineage.parents[0] == "arithmetic-few-shot@1"
    assert saved.lineage.details["candidates_tried"] == summary["candidates_tried"]
    assert {key for key in summary if key.startswith("best_")} >= {"best_candidate", "best_dev_accuracy",
                                                                  "best_saved_as", "best_library"}
    assert (out / "candidates.csv").exists() and (out / "dev" / "cases.jsonl").exists()
    assert "best: " in result.stdout and "saved as" in result.stdout and "arithmetic-few-shot@2" in result.stdout
    assert DEFAULT_LIBRARY.read_bytes() == shipped
    _registered_in_mlflow(out, summary, saved)


def _registered_in_mlflow(out, summary: dict, saved) -> None:
    """The saved version in MLflow's prompt registry with its score and lineage, and the run that wrote it."""
    from mlflow.tracking import MlflowClient

    uri = record.tracking_uri(out.parent)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.load_prompt(f"prompts:/{saved.name}@latest")
    assert version.tags["llmc.ref"] == saved.ref and float(version.tags["llmc.score"]) == saved.score
    assert version.tags["llmc.parents"].split(",") == saved.lineage.parents
    assert version.tags["llmc.method"] == "bootstrap_few_shot"
    assert "{{input}}" in version.template[-1]["content"]  # the question, a placeholder MLflow's format() fills
    run = client.get_run(version.tags["llmc.run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["llmc.kind"] == "optimize"
    assert run.data.metrics["best_dev_accuracy"] == summary["best_dev_accuracy"]
