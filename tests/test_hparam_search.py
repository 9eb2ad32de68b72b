"""`llmc search` over fine-tuning hyperparameters: Tune trials on the session's cluster, each a real Ray Train run of
the tiny LoRA recipe; ASHA stops trials whose eval loss trails; the best finished trial's adapter is servable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_llmc
from workloads.common.recipe import RecipeError, apply_override
from workloads.kinds import load_recipe

RECIPE = REPO / "workloads/configs/tiny-hparam-search.yaml"


def test_asha_stops_weak_trials_and_the_best_finished_trial_is_exported(ray_cluster, tiny_model_dir, tmp_path):
    out = tmp_path / "hparam"
    result = run_llmc("search", str(RECIPE), "--output-dir", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    trials = summary["trials"]
    assert summary["num_trials"] == len(trials) >= 4 and not [t for t in trials if t["error"]], trials
    # Every trial reported its evaluations (every 3 steps) to Tune; ASHA stopped some at a rung, short of 12 steps.
    assert all(t["curve"] and [s for s, _ in t["curve"]] == list(range(3, t["step"] + 1, 3)) for t in trials), trials
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped and all(t["step"] < t["total_steps"] and t["step"] in summary["rungs"] for t in stopped), trials
    assert summary["steps_trained"] < summary["steps_exhaustive"]
    # The best is the finished trial with the lowest eval loss.
    finished = [t for t in trials if not t["stopped_early"]]
    assert finished and all(t["step"] == t["total_steps"] for t in finished)
    best = min(finished, key=lambda t: t["eval_loss"])
    assert summary["best_trial"] == best["trial"] and summary["best_eval_loss"] == best["eval_loss"]
    assert summary["best_config"] == best["config"] == {k: best[k] for k in best["config"]}
    assert best["config"]["learning_rate"] == 1e-2  # 12 steps at 1e-4 barely move the adapter
    # Its adapter: the fine-tuning run's own export, loadable with PEFT onto the tiny model, accepted by `llmc serve`.
    adapter = Path(summary["best_artifact"])
    assert adapter == out / "best" / "adapter" and (out / "best" / "summary.json").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == best["config"]["lora_r"] and config["lora_alpha"] == best["config"]["lora_alpha"]
    import torch
    from peft import PeftModel

    from workloads.models.loading import load_model, load_tokenizer
    from workloads.serve.deploy import check_before_start

    tokenizer = load_tokenizer(str(tiny_model_dir))
    batch = tokenizer(["<|im_start|>user\n12 + 30<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt",
                      add_special_tokens=False)
    base = load_model(str(tiny_model_dir))
    with torch.no_grad():
        base_logits = base(**batch).logits
        tuned_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(**batch).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)
    serve = load_recipe(REPO / "workloads/configs/serve-tiny.yaml", [f"adapters.paths={{best: {adapter}}}"],
                        kind="serve")
    assert check_before_start(serve, keys=[]) == {"best": adapter}
    # The files for a person: the trial table as CSV, the plot, the printed table.
    with (out / "trials.csv").open() as handle:
        assert [row["trial"] for row in csv.DictReader(handle)] == [t["trial"] for t in trials]
    assert (out / "search.png").stat().st_size > 0
    assert "best: " in result.stdout and "stopped early" in result.stdout and "Tune" not in result.stdout


def _broken(tmp_path: Path, *changes: str) -> Path:
    raw = yaml.safe_load(RECIPE.read_text())
    for change in changes:
        apply_override(raw, change)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ("search.grace_perod=3", "search.grace_perod", "unknown field"),
        ("space.learning_rate=[0.01, -1]", "space.learning_rate.1", "greater than 0"),
        ("finetune=no/such/recipe.yaml", "finetune", "file not found"),
    ],
)
def test_a_broken_search_recipe_exits_2_naming_the_field_before_any_work(tmp_path, change, field, says):
    out = tmp_path / "out"
    result = run_llmc("search", str(_broken(tmp_path, change)), "--output-dir", str(out), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"field '{field}'" in result.stderr and says in result.stderr, result.stderr
    assert "Ray" not in result.stdout + result.stderr and not out.exists()


def test_the_fine_tuning_recipe_and_every_trial_are_validated_with_the_search(tmp_path):
    with pytest.raises(RecipeError) as info:  # the fine-tuning recipe, with the search's overrides
        load_recipe(_broken(tmp_path, "overrides=[train.method=sft]"))
    assert "field 'finetune'" in str(info.value) and "field 'train.method'" in str(info.value)
    with pytest.raises(RecipeError, match="search.grace_period"):  # a trial is judged on an evaluation
        load_recipe(_broken(tmp_path, "search.grace_period=2"))
    with pytest.raises(RecipeError, match="need a LoRA method"):
        load_recipe(_broken(tmp_path, "overrides=[train.method=full]"))
    recipe = load_recipe(RECIPE)
    trials = recipe.trials()
    assert [t.name for t in trials] == [f"tiny-hparam-search-0{i}" for i in range(4)]
    assert {(t.recipe.train.learning_rate, t.recipe.lora.r) for t in trials} == {(a, b) for a in (1e-2, 1e-4)
                                                                                 for b in (8, 16)}
    assert all(t.recipe.run.name == t.name and t.recipe.scaling.num_workers == 1 for t in trials)
