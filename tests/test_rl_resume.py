"""Fault tolerance of the PPO/GRPO loop (workloads.align.rl): a checkpoint restores the whole state, so a resumed
trainer continues exactly as an uninterrupted one; resuming with no checkpoint is a recipe error. (A PPO run on Ray
SIGKILLed mid-way and resumed: tests/test_rl_loop.py, whose PPO run is that one.)

Runs are tiny (2 prompts x 2 completions of at most 4 tokens per iteration) so the module stays cheap.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, run_llmc
from workloads.align.recipe import AlignRecipe  # noqa: F401  (registers kind align)
from workloads.config import RecipeError, load_recipe

PPO = REPO / "workloads/configs/tiny-ppo.yaml"
# length_penalty's scores vary with each completion's length, so every iteration has advantages to learn from.
TINY = ["rl.prompts_per_iteration=2", "rl.group_size=2", "rl.max_new_tokens=4", "train.learning_rate=1e-2",
        "rewards=[{function: length_penalty, args: {limit: 8}}]"]
IN_PROCESS = ["scaling.num_workers=1", "deepspeed.enabled=false"]  # a trainer in this process, without Ray
TIMINGS = {"generation_s", "scoring_s", "logprobs_s", "training_s", "weight_sync_s", "iteration_s"}  # vary by run


def _trainer(model_dir, *overrides: str):
    from workloads.align.prompts import split_prompts
    from workloads.align.rl import RLTrainer

    recipe = load_recipe(PPO, [*TINY, *IN_PROCESS, *overrides], kind="align")
    train, held_out = split_prompts(recipe.data, recipe.train.seed)
    return RLTrainer(recipe, str(model_dir), train, held_out)


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def test_a_trainer_resumed_from_a_checkpoint_continues_as_the_uninterrupted_one(tiny_model_dir, tmp_path):
    """Policy, critic, optimizer, schedule, adaptive KL coefficient, prompt order and RNG states all come back: the
    resumed iteration 2 is the uninterrupted run's, to the bit."""
    from workloads.align import rl, rl_checkpoints

    overrides = ("rl.iterations=2", "rl.eval_prompts=0", "train.checkpoint_every=1")
    uninterrupted = _trainer(tiny_model_dir, *overrides)
    written = []
    rows = rl.train(uninterrupted, checkpoint=lambda rows: written.append(
        rl_checkpoints.write_checkpoint(uninterrupted, {"iteration": rows[-1]["iteration"], "rows": rows,
                                                        "restarts": []}, tmp_path, keep=2)))
    assert written == rl_checkpoints.list_checkpoints(tmp_path) == [tmp_path / "checkpoint_000001",
                                                                    tmp_path / "checkpoint_000002"]
    assert not list(tmp_path.glob(".*"))  # no temporary directory left behind

    resumed = _trainer(tiny_model_dir, *overrides)
    state = resumed.load_checkpoint(written[0])
    assert state["iteration"] == 1 and state["rows"] == _json(rows[:2])
    assert resumed.kl.value == state["kl_coef"] != resumed.rl.kl.coef  # adapted after iteration 1, and restored
    saved = torch.load(written[0] / rl.TENSORS, weights_only=True)["optimizer"]["state"]
    assert saved and all(torch.equal(resumed.optimizer.state[p]["exp_avg"], saved[i]["exp_avg"])
                         for i, p in enumerate(resumed.optimizer.param_groups[0]["params"]
                                               + resumed.optimizer.param_groups[1]["params"]))
    again = rl.train(resumed, rows=state["rows"])

    assert [r["iteration"] for r in again] == [0, 1, 2]
    assert _without_timings(again) == _without_timings(_json(rows))
    assert resumed.kl.value == uninterrupted.kl.value
    for mine, theirs in ((resumed.policy.parameters(), uninterrupted.policy.parameters()),
                         (resumed.critic.parameters(), uninterrupted.critic.parameters()),
                         ([t for s in resumed.optimizer.state.values() for t in s.values()],
                          [t for s in uninterrupted.optimizer.state.values() for t in s.values()])):
        mine, theirs = list(mine), list(theirs)
        assert mine and len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def _json(rows: list[dict]) -> list[dict]:
    """Rows as a checkpoint's JSON gives them back."""
    return json.loads(json.dumps(rows))


def test_resume_latest_without_a_checkpoint_is_a_recipe_error(tmp_path):
    result = run_llmc("align", str(PPO), "--output-dir", str(tmp_path / "none"), "--set", "run.resume_from=latest",
                      timeout=300)
    assert result.returncode == 2, result.stdout[-4000:] + result.stderr[-4000:]
    assert "field 'run.resume_from': no checkpoint of run 'tiny-ppo' to resume" in result.stderr, result.stderr
    assert not (tmp_path / "none").exists()  # refused before anything was written


def test_only_ppo_and_grpo_resume():
    with pytest.raises(RecipeError, match=r"field 'run'.*run.resume_from: dpo runs do not resume yet"):
        load_recipe(REPO / "workloads/configs/tiny-dpo.yaml", ["run.resume_from=latest"], kind="align")
