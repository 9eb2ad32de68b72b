"""Reward functions for the RL methods: built-ins, `module:function` names checked before any work, weighted terms,
a trained reward model as a term; and the ppo/grpo/rloo recipe rules, each naming its field."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from tests.conftest import REPO, run_llmc
from workloads.align.rewards import (
    BUILTINS,
    build_reward,
    exact_answer,
    import_rewards,
    length_penalty,
    resolve_function,
)
from workloads.common.recipe import RecipeError
from workloads.kinds import load_recipe

GRPO = REPO / "workloads/configs/tiny-grpo.yaml"
PROMPT = [{"role": "user", "content": "Add the two numbers and state the sum in a sentence.\n\n49 + 97"}]


def test_exact_answer_scores_the_final_number():
    assert exact_answer(PROMPT, "The sum of 49 and 97 is 146.", "The sum of 49 and 97 is 146.") == 1.0
    assert exact_answer(PROMPT, "49 + 97 = 146", "The sum of 49 and 97 is 146.") == 1.0  # any phrasing
    assert exact_answer(PROMPT, "The sum of 49 and 97 is 145.", "The sum of 49 and 97 is 146.") == 0.0
    assert exact_answer(PROMPT, "The sum of 146 and 97.", "The sum of 49 and 97 is 146.") == 0.0  # last, not any
    assert exact_answer(PROMPT, "", "146") == 0.0


def test_format_wants_an_answer_line():
    fmt = BUILTINS["format"]
    assert fmt(PROMPT, "49 + 97 makes\nAnswer: 146", "146") == 1.0
    assert fmt(PROMPT, "  Answer: 146", "146") == 1.0
    assert fmt(PROMPT, "Answer:", "146") == 0.0  # a line with nothing after it
    assert fmt(PROMPT, "Final Answer: 146", "146") == 0.0  # the line starts with Answer:
    assert fmt(PROMPT, "The sum of 49 and 97 is 146.", "146") == 0.0  # what the tiny model writes


def test_length_penalty():
    assert length_penalty(PROMPT, "x" * 200, "") == 0.0
    assert length_penalty(PROMPT, "x" * 300, "") == -0.5
    assert length_penalty(PROMPT, "x" * 900, "") == -1.0
    assert length_penalty(PROMPT, "x" * 15, "", limit=10) == -0.5


def test_reward_terms_are_weighted_and_kept_apart(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def shouts(prompt, completion, reference, bonus):
            return bonus if completion.isupper() else 0.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe(GRPO, ["rewards=[{function: exact_answer, weight: 1.0}, "
                                "{function: 'my_rewards:shouts', weight: 0.5, args: {bonus: 2.0}}]"])
    reward = build_reward(recipe.rewards)
    totals, parts = reward.score([PROMPT] * 3, ["146", "NO", "ANSWER 146"], ["146"] * 3)
    assert parts == {"exact_answer": [1.0, 0.0, 1.0], "my_rewards:shouts": [0.0, 2.0, 2.0]}
    assert totals == [1.0, 1.0, 2.0]


@pytest.mark.parametrize(("name", "said"), [
    ("nosuch_pkg.rewards:fn", "module 'nosuch_pkg' not found"),
    ("workloads.scoring:no_such_fn", "module 'workloads.scoring' has no 'no_such_fn'"),
    ("workloads.scoring:SCORERS", "is not callable (a dict)"),
    ("workloads.answers:final_number", "cannot be called as fn(prompt, completion, reference, **args)"),
    ("exact", "not a built-in reward (exact_answer, format, length_penalty)"),
    ("workloads.scoring:", "expected module:function"),
])
def test_a_bad_function_name_is_refused(name, said):
    with pytest.raises(ValueError) as info:
        resolve_function(name)
    assert said in str(info.value) and name in str(info.value), str(info.value)


def test_reward_model_is_a_term(tiny_model_dir, tmp_path):
    """A model as `method: reward` saves it (a one-output sequence classifier) scores prompt plus completion as one
    conversation, through the same `load_reward_model(path).score` the reward method's summary uses."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from workloads.align.reward import load_reward_model
    from workloads.models.loading import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    model.config.pad_token_id = load_tokenizer(str(tiny_model_dir)).pad_token_id
    model.save_pretrained(tmp_path / "rm")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "rm")
    recipe = load_recipe(GRPO, [f"rewards=[{{model: {tmp_path / 'rm'}, weight: 2.0}}, {{function: exact_answer}}]"])
    totals, parts = build_reward(recipe.rewards).score([PROMPT] * 2, ["146", "12"], ["146", "146"])
    direct = load_reward_model(tmp_path / "rm").score([[*PROMPT, {"role": "assistant", "content": c}]
                                                       for c in ("146", "12")])
    assert parts["model"] == pytest.approx(direct) and direct[0] != direct[1]
    assert totals == pytest.approx([2 * direct[0] + 1.0, 2 * direct[1]])


RL_SCHEMA_ERRORS = {  # override -> (field named, what the message says)
    "rewards=[]": ("rewards", "grpo needs at least one reward term"),
    "rewards=[{function: 'no_such_module:fn'}]": ("rewards.0.function", "module 'no_such_module' not found"),
    "rewards=[{function: exact_answer}, {function: 'workloads.scoring:nope'}]":
        ("rewards.1.function", "'workloads.scoring:nope': module 'workloads.scoring' has no 'nope'"),
    "rewards=[{function: length_penalty, args: {limit: 5, unit: chars}}]":
        ("rewards.0", "got an unexpected keyword argument 'unit'"),
    "rewards=[{function: 'workloads.scoring:build_scorer'}]":
        ("rewards.0", "cannot be called as fn(prompt, completion, reference, **args)"),
    "rewards=[{function: exact_answer, model: runs/rm}]": ("rewards.0", "exactly one of function or model"),
    "rewards=[{model: no/such/dir}]": ("rewards.0", "not a saved reward model"),
    "rewards=[{function: exact_answer}, {function: exact_answer, weight: 2}]":
        ("rewards", "exact_answer appears twice"),
    "rl.group_size=1": ("rl", "rl.group_size: grpo normalizes rewards within each prompt's group"),
    "rl.max_new_tokens=96": ("rl", "rl.max_new_tokens (96) leaves no room for a prompt within data.max_length (96)"),
    "rl.temperature=0": ("rl.temperature", "greater than 0"),
    "rl.clip_range=1.5": ("rl.clip_range", "less than 1"),
    "rl.kl.estimator=k2": ("rl.kl.estimator", "'k1' or 'k3'"),
    "rl.adapter=no/such/adapter": ("rl.adapter", "not a PEFT adapter directory"),
    "rl.rollout=sglang": ("rl.rollout", "'generate' or 'vllm'"),
    "rl.engine.kv_cache_gib=0": ("rl.engine.kv_cache_gib", "greater than 0"),
    "lora.use_dora=true": ("lora", "lora.use_dora: vLLM cannot serve such an adapter to rl.rollout: vllm"),
    "train.max_steps=10": ("train", "train.max_steps: grpo runs rl.iterations"),
    "data.format=preference": ("data", "data.format: grpo samples answers to prompts"),
    "train.gradient_checkpointing=true": ("train", "not supported by grpo yet"),
    "run.storage_path=s3://bucket/runs": ("run", "grpo writes its checkpoints to a local directory"),
}


@pytest.mark.parametrize("override", RL_SCHEMA_ERRORS)
def test_bad_rl_recipe_is_refused_naming_the_field(override):
    field, said = RL_SCHEMA_ERRORS[override]
    with pytest.raises(RecipeError) as info:
        load_recipe(GRPO, [override], kind="align")
    assert f"field '{field}'" in str(info.value) and said in str(info.value), str(info.value)


def test_rloo_validates_as_grpo_does_and_needs_a_group():
    """The shipped GRPO recipe run as RLOO validates through `llmc validate`; a group of one is refused naming the
    field, as under GRPO."""
    result = run_llmc("validate", str(GRPO), "--set", "method=rloo", "--print", timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "method: rloo" in result.stdout.splitlines()
    plan = run_llmc("validate", str(GRPO), "--set", "method=rloo", timeout=120)
    assert json.loads(plan.stdout)["rollout_engines"] == 1, plan.stdout  # the RL plan, not fine-tuning's
    with pytest.raises(RecipeError) as info:
        load_recipe(GRPO, ["method=rloo", "rl.group_size=1"], kind="align")
    assert ("field 'rl'" in str(info.value) and "rl.group_size: rloo baselines each completion with the mean reward of "
            "the others of its prompt's group: at least 2" in str(info.value)), str(info.value)


def test_reward_terms_only_for_rl():
    with pytest.raises(RecipeError, match="rewards are for ppo, grpo or rloo"):
        load_recipe(REPO / "workloads/configs/tiny-dpo.yaml", ["rewards=[{function: exact_answer}]"])


def test_a_missing_reward_function_fails_before_any_work(tmp_path):
    """Through `llmc align`: exit 2 naming the field and the function, no Ray, no model, no run directory."""
    out = tmp_path / "run"
    result = run_llmc("align", str(GRPO), "--output-dir", str(out), "--set",
                      "rewards=[{function: exact_answer}, {function: 'mypkg.rewards:correct', weight: 0.2}]",
                      timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "field 'rewards.1.function'" in result.stderr and "'mypkg.rewards:correct'" in result.stderr
    assert "module 'mypkg' not found" in result.stderr, result.stderr
    assert "Ray" not in result.stdout + result.stderr and not out.exists()



def test_validating_a_recipe_runs_none_of_its_reward_module_until_the_run_starts(tmp_path, monkeypatch):
    """A `module:function` reward is checked from its source: the package's and the module's import-time code (each
    writes a marker file) do not run when the recipe is loaded, nor when it names a missing function; the run's
    start imports it (the driver's check, then the reward the workers build)."""
    package = tmp_path / "untrusted"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(tmp_path / 'package-ran')!r}, 'w').close()\n")
    (package / "rewards.py").write_text(textwrap.dedent(f"""
        open({str(tmp_path / 'module-ran')!r}, 'w').close()

        def shouts(prompt, completion, reference, bonus=1.0):
            return bonus if completion.isupper() else 0.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    term = "rewards=[{function: 'untrusted.rewards:shouts', args: {bonus: 2.0}}]"
    recipe = load_recipe(GRPO, [term], kind="align")
    for missing, field, said in [
        ("untrusted.rewards:nope", "rewards.0.function", "module 'untrusted.rewards' has no 'nope'"),
        ("untrusted.other:shouts", "rewards.0.function", "module 'untrusted.other' not found"),
    ]:
        with pytest.raises(RecipeError) as info:
            load_recipe(GRPO, [f"rewards=[{{function: '{missing}'}}]"], kind="align")
        assert f"field '{field}'" in str(info.value) and said in str(info.value), str(info.value)
    with pytest.raises(RecipeError, match="got an unexpected keyword argument 'unit'"):  # the def's own parameters
        load_recipe(GRPO, [term.replace("bonus: 2.0", "unit: 2")], kind="align")
    assert not (tmp_path / "package-ran").exists() and not (tmp_path / "module-ran").exists()
    assert "untrusted" not in sys.modules

    import_rewards(recipe.rewards)  # the run starts (workloads.align.run)
    assert (tmp_path / "package-ran").exists() and (tmp_path / "module-ran").exists()
    assert build_reward(recipe.rewards).score([PROMPT] * 2, ["YES", "no"], ["", ""])[0] == [2.0, 0.0]


def test_a_reward_that_only_the_import_shows_is_bad_fails_at_the_run_start_naming_the_field(tmp_path, monkeypatch):
    """Bound, but not by a plain def (here a dict): validation cannot tell; the run's start refuses it, exit 2's
    error, before any cluster work."""
    (tmp_path / "table_rewards.py").write_text("SCORES = {'a': 1.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = load_recipe(GRPO, ["rewards=[{function: exact_answer}, {function: 'table_rewards:SCORES'}]"])
    with pytest.raises(RecipeError, match=r"field 'rewards.1.function': 'table_rewards:SCORES' is not callable"):
        import_rewards(recipe.rewards)
