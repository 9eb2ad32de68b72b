"""Fault tolerance of the PPO/GRPO loop (workloads.align.rl): a checkpoint restores the whole state, so a resumed
trainer continues exactly as an uninterrupted one; a PPO run on Ray (two Train workers, DeepSpeed ZeRO-2) whose
driver is SIGKILLed mid-way continues its iteration count with `run.resume_from=latest`, its DeepSpeed state
included; resuming with no checkpoint is a recipe error.

Runs are tiny (2 prompts x 2 completions of at most 4 tokens per iteration) so the module stays cheap.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, read_metrics_csv, run_llmc
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
    from workloads.align import rl, rl_run

    overrides = ("rl.iterations=2", "rl.eval_prompts=0", "train.checkpoint_every=1")
    uninterrupted = _trainer(tiny_model_dir, *overrides)
    written = []
    rows = rl.train(uninterrupted, checkpoint=lambda rows: written.append(
        rl_run.write_checkpoint(uninterrupted, {"iteration": rows[-1]["iteration"], "rows": rows, "restarts": []},
                                tmp_path, keep=2)))
    assert written == rl_run.list_checkpoints(tmp_path) == [tmp_path / "checkpoint_000001",
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


def test_a_killed_ppo_run_resumes_from_its_last_checkpoint_and_continues_the_iteration_count(ray_cluster, tmp_path):
    """The driver dies with SIGKILL (its Train workers go with it, as its job's actors do); the rerun with
    run.resume_from=latest loads the newest checkpoint, the DeepSpeed engines' state included."""
    from workloads.align import rl
    from workloads.align import rl_run as rl_checkpoints
    from workloads.align.run import run

    out = tmp_path / "ppo"
    sets = [arg for o in (*TINY, "rl.eval_prompts=2", "train.checkpoint_every=1", "train.log_every=1",
                          "train.keep_checkpoints=10") for arg in ("--set", o)]
    command = [sys.executable, "-m", "workloads.cli", "align", str(PPO), "--output-dir", str(out), *sets]
    log = tmp_path / "killed.log"
    with log.open("w") as handle:  # 50 iterations: far more than it gets to before the kill
        proc = subprocess.Popen([*command, "--set", "rl.iterations=50"], cwd=REPO, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    checkpoints = out / "checkpoints" / "tiny-ppo"
    try:
        deadline = time.monotonic() + 300
        while not rl_checkpoints.list_checkpoints(checkpoints) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, f"it ended before a checkpoint (exit {proc.returncode}):\n{log.read_text()[-4000:]}"
        assert rl_checkpoints.list_checkpoints(checkpoints), "no checkpoint in 300 s:\n" + log.read_text()[-4000:]
    finally:
        proc.kill()  # SIGKILL: no handler runs, whatever was being written stays as it was
        proc.wait(timeout=60)
    assert not (out / "summary.json").exists() and not (out / "metrics.csv").exists()
    last = rl_checkpoints.list_checkpoints(checkpoints)[-1]
    assert (last / rl.DEEPSPEED_STATE).is_dir()  # two workers' ZeRO-2 optimizer shards
    saved = json.loads((last / rl.TRAINER_STATE).read_text())
    k = saved["iteration"]
    assert last.name == f"checkpoint_{k:06d}" and [r["iteration"] for r in saved["rows"]] == list(range(k + 1))

    with pytest.raises(RecipeError, match=r"--overwrite to replace it, or --set run.resume_from=latest"):
        run(load_recipe(PPO, TINY, kind="align"), output_dir=str(out))  # a rerun never replaces it silently

    total = k + 2  # a shorter run than the killed one's 50, to stay cheap: two more iterations
    result = run_llmc("align", *command[4:], "--set", f"rl.iterations={total}", "--set", "run.resume_from=latest",
                      timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"resumed from {last}: iteration {k}" in result.stdout
    done = [int(n) for n in re.findall(rf"^\[llmc\] ppo (\d+)/{total}:", result.stdout, re.MULTILINE)]
    assert done == [k + 1, total], result.stdout[-4000:]  # this process ran only the iterations after the checkpoint
    rows = read_metrics_csv(out)
    assert [int(r["iteration"]) for r in rows] == list(range(total + 1))  # each once, the killed run's included
    assert [float(r["mean_reward"]) for r in rows[1 : k + 1]] == [r["mean_reward"] for r in saved["rows"][1:]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == total and summary["restarts"] == [{"from_iteration": k, "via": "resume_from"}]
    kept = [p.name for p in rl_checkpoints.list_checkpoints(checkpoints)]
    assert kept[-3:] == [f"checkpoint_{i:06d}" for i in (k, k + 1, total)] and summary["checkpoint"].endswith(kept[-1])
    assert not list(checkpoints.glob(".*"))  # a checkpoint half-written at the kill, if any, is cleaned up
    assert (out / "adapter/adapter_model.safetensors").exists() and (out / "curves.png").exists()


def test_resume_latest_without_a_checkpoint_is_a_recipe_error(tmp_path):
    result = run_llmc("align", str(PPO), "--output-dir", str(tmp_path / "none"), "--set", "run.resume_from=latest",
                      timeout=300)
    assert result.returncode == 2, result.stdout[-4000:] + result.stderr[-4000:]
    assert "field 'run.resume_from': no checkpoint of run 'tiny-ppo' to resume" in result.stderr, result.stderr
    assert not (tmp_path / "none").exists()  # refused before anything was written


def test_only_ppo_and_grpo_resume():
    with pytest.raises(RecipeError, match=r"field 'run'.*run.resume_from: dpo runs do not resume yet"):
        load_recipe(REPO / "workloads/configs/tiny-dpo.yaml", ["run.resume_from=latest"], kind="align")
