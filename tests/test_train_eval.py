"""Schedule, evaluation during training and early stopping, as Axolotl / torchtune / TRL users expect them:
`train.num_epochs`, perplexity and a generation score at each eval, patience on a named metric, the best
checkpoint as the artifact. The loop runs for real on the tiny model, with Ray's worker calls stood in for."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import REPO
from workloads.common.recipe import RecipeError
from workloads.finetune import driver, schedule, worker
from workloads.finetune.evaluation import EarlyStopping, GenerationCase, generation_cases, generation_score, perplexity
from workloads.finetune.strategy import lr_lambda
from workloads.kinds import load_recipe
from workloads.scoring import SCORERS, ExactScorer, build_scorer

TINY = REPO / "workloads/configs/tiny-lora.yaml"
EPOCHS = ["train.max_steps=null", "train.num_epochs=2"]


# -- schema ----------------------------------------------------------------------------------------


def test_exactly_one_of_max_steps_and_num_epochs():
    assert load_recipe(TINY).train.max_steps == 60  # shipped recipes (max_steps only) still validate
    assert load_recipe(TINY, EPOCHS).train.num_epochs == 2
    for overrides, got in ((["train.num_epochs=2"], "both"), (["train.max_steps=null"], "neither")):
        with pytest.raises(RecipeError) as info:
            load_recipe(TINY, overrides)
        message = str(info.value)
        assert "field 'train'" in message and "max_steps" in message and "num_epochs" in message, message
        assert got in message
    with pytest.raises(RecipeError, match="train.num_epochs"):
        load_recipe(TINY, ["train.max_steps=null", "train.num_epochs=0"])


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["eval.scorer=fuzzy"], "eval.scorer", "'final_number' or 'exact'"),
        (["eval.metric=accuracy"], "eval.metric", "'eval_loss', 'eval_perplexity' or 'eval_exact_match'"),
        (["eval.metric=eval_exact_match"], "eval", "generate: true"),
        (["eval.early_stopping_patience=0"], "eval.early_stopping_patience", "greater than or equal to 1"),
        (["eval.generate=true", "data.format=text"], "(recipe)", "chat data.format"),
        (["eval.keep_best=true", "data.eval_path=null", "data.eval_fraction=0"], "(recipe)", "need eval data"),
        (["tracking.backends=[tensorboard, comet]"], "tracking.backends.1", "'tensorboard', 'mlflow' or 'wandb'"),
        (["tracking.backends=[mlflow, mlflow]"], "tracking.backends", "once"),
    ],
)
def test_bad_eval_and_tracking_fields_are_named(overrides, field, says):
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, overrides)
    assert f"field '{field}'" in str(info.value) and says in str(info.value), str(info.value)


def test_wandb_without_the_package_is_a_schema_error_saying_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, ["tracking.backends=[tensorboard, wandb]"])
    assert "field 'tracking.backends'" in str(info.value) and "pip install wandb" in str(info.value)


def test_every_new_field_has_a_description():
    from workloads.common.tracking import TrackingConfig
    from workloads.finetune.recipe import EvalConfig, TrainConfig

    for model, names in ((TrainConfig, ["max_steps", "num_epochs"]), (EvalConfig, list(EvalConfig.model_fields)),
                         (TrackingConfig, list(TrackingConfig.model_fields))):
        for name in names:
            assert model.model_fields[name].description, f"{model.__name__}.{name}"


# -- schedule --------------------------------------------------------------------------------------


def test_steps_follow_examples_batch_accumulation_and_workers():
    # 4000 examples on 2 workers: 2000 each; 16 x 2 per step -> 62 steps an epoch (the remainder is skipped).
    assert schedule.steps_per_epoch(4000, 16, 2, 2) == 62
    assert schedule.steps_per_epoch(4000, 16, 1, 2) == 125 and schedule.steps_per_epoch(31, 16, 1, 2) == 0
    train = load_recipe(TINY, ["train.max_steps=null", "train.num_epochs=0.24"]).train
    assert schedule.total_steps(train, 125) == 30  # 0.24 x 125 is 30.000000000000004 in floats: not 31
    assert schedule.total_steps(load_recipe(TINY, EPOCHS).train, 125) == 250
    assert schedule.total_steps(load_recipe(TINY).train, 125) == 60  # max_steps decides, whatever the data
    assert "250 optimizer steps (2 epoch(s) x 125 steps" in schedule.describe(load_recipe(TINY, EPOCHS).train, 125, 2)


def test_the_worker_batching_and_the_driver_agree_on_an_epoch():
    recipe = load_recipe(TINY, [*EPOCHS, "train.gradient_accumulation_steps=3"])
    examples = [{"input_ids": [1, 2], "labels": [1, 2]}] * 1000
    batches = worker.StepBatches(examples, recipe, rank=1, world_size=2, pad_id=0)
    assert batches.steps_per_epoch == schedule.steps_per_epoch(1000, 16, 3, 2) == 10


def test_the_driver_resolves_epochs_from_the_tokenized_data_before_ray(tiny_model_dir, capsys):
    prepared = driver.prepare(load_recipe(TINY, EPOCHS))  # the data every worker trains on, tokenized once
    assert prepared.total_steps == 250 and len(prepared.data[0]) == 4000  # 2 x (4000 / 2 workers / 16)
    assert "[llmc] schedule: 250 optimizer steps (2 epoch(s) x 125 steps; global batch 32)" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="field 'train.num_epochs': 20 training examples cannot fill one"):
        driver.prepare(load_recipe(TINY, [*EPOCHS, "data.max_samples=20"]))


def test_warmup_ratio_works_off_the_resolved_step_count():
    train = load_recipe(TINY, [*EPOCHS, "train.warmup_ratio=0.1", "train.lr_scheduler=linear",
                               "train.min_lr_ratio=0.0"]).train
    total = schedule.total_steps(train, 125)  # 250
    factor = lr_lambda(train, total)
    assert train.warmup_for(total) == 25 and factor(25) == pytest.approx(1.0)
    assert factor(25 + 225 // 2) == pytest.approx(0.5, abs=0.01) and factor(250) == pytest.approx(0.0)


# -- scoring and early stopping --------------------------------------------------------------------


def test_scorers_exact_and_final_number():
    exact, final = build_scorer({"type": "exact"}).score, build_scorer({"type": "final_number"}).score
    assert exact(" The sum is 5.\n", "The sum is 5.") and not exact("The sum is 6", "The sum is 5.")
    assert exact("the SUM is 5", "The sum is 5.")  # case and punctuation aside, as prompt evaluation compares
    assert final("The sum of 17 and 72 is 89.", "The sum of 17 and 72 is 89.")
    assert final("89", "The sum of 17 and 72 is 89.") and not final("The sum of 17 and 72 is 99.", "... 89.")
    assert not final("no number", "no number either")  # a reference without a number matches nothing
    assert perplexity(math.log(20.0)) == pytest.approx(20.0) and perplexity(1000.0) == math.inf


def test_early_stopping_counts_evaluations_without_improvement_and_keeps_the_best():
    recipe = load_recipe(TINY, ["eval.early_stopping_patience=2", "eval.min_delta=0.05"])
    stopper = EarlyStopping.from_config(recipe.eval)
    assert stopper.mode == "min"
    seen = [(s, stopper.update(s, v), stopper.should_stop) for s, v in ((10, 3.0), (20, 2.0), (30, 1.98), (40, 2.5))]
    # 1.98 is a new best (kept) but not better by more than min_delta: patience runs out at step 40.
    assert seen == [(10, True, False), (20, True, False), (30, True, False), (40, False, True)]
    assert (stopper.best_step, stopper.best_value, stopper.improvements) == (30, 1.98, 3)
    again = EarlyStopping.from_config(recipe.eval, json.loads(json.dumps(stopper.state())))  # through a checkpoint
    assert again == stopper
    fresh = EarlyStopping.from_config(load_recipe(TINY, ["eval.metric=eval_perplexity"]).eval, stopper.state())
    assert fresh.best_step is None  # saved for another metric: start over


def test_exact_match_is_maximized_and_a_missing_value_is_no_improvement():
    recipe = load_recipe(TINY, ["eval.generate=true", "eval.metric=eval_exact_match", "eval.early_stopping_patience=1"])
    stopper = EarlyStopping.from_config(recipe.eval)
    assert stopper.mode == "max" and stopper.update(5, 0.25) and not stopper.update(10, 0.25)  # a tie is no best
    assert stopper.should_stop and stopper.best_step == 5
    assert not EarlyStopping.from_config(recipe.eval).update(5, None)


# -- generation score on the tiny model ------------------------------------------------------------


def test_generation_score_greedy_replies_scored_and_shared_between_ranks(tiny_model_dir, monkeypatch):
    from workloads.models.loading import load_model, load_tokenizer
    from workloads.models.pretrain import greedy_answers

    recipe = load_recipe(TINY, ["eval.generate=true", "eval.generate_samples=5", "eval.max_new_tokens=16",
                                "eval.scorer=exact"])
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    cases = generation_cases(recipe, tokenizer)
    assert len(cases) == 5 and cases[0].reference == "The sum of 17 and 72 is 89."  # the bundled eval set's first
    assert tokenizer.decode(cases[0].prompt_ids).endswith("17 + 72<|im_end|>\n<|im_start|>assistant\n")
    # References set to the model's own greedy replies (16 new tokens) score 1; the bundled ones are out of its reach.
    prompts = [[{"role": "user", "content": tokenizer.decode(c.prompt_ids).split("user\n")[1].split("<|im_end|>")[0]}]
               for c in cases]
    own = [GenerationCase(c.prompt_ids, reply) for c, reply in
           zip(cases, greedy_answers(model, tokenizer, prompts, max_new_tokens=16), strict=True)]
    assert generation_score(model, tokenizer, own, recipe.eval, batch_size=2) == 1.0
    assert generation_score(model, tokenizer, cases, recipe.eval, batch_size=4) == 0.0
    # Two ranks without a process group: each scores only its own share (rank 1: cases 1 and 3, no padding counted).
    mixed = [own[0], cases[1], own[2], own[3], cases[4]]
    assert generation_score(model, tokenizer, mixed, recipe.eval, rank=0, world_size=2) == pytest.approx(2 / 3)
    assert generation_score(model, tokenizer, mixed, recipe.eval, rank=1, world_size=2) == pytest.approx(1 / 2)
    assert model.training is False
    seen = []  # eval.scorer is looked up in the one scorer table, as prompt evaluation and RL rewards do

    class Recorded(ExactScorer):
        def score(self, prediction, reference):
            seen.append(reference)
            return super().score(prediction, reference)

    monkeypatch.setitem(SCORERS, "exact", Recorded)
    assert generation_score(model, tokenizer, own[:2], recipe.eval, batch_size=2) == 1.0
    assert seen == [case.reference for case in own[:2]]
