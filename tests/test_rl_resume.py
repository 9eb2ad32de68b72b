"""Fault tolerance of the PPO/GRPO loop (workloads.align.rl): a checkpoint restores the whole state, so a resumed
trainer continues exactly as an uninterrupted one, in one process and on two workers with DeepSpeed (each worker's
own random generators restored); resuming with no checkpoint is a recipe error. (A PPO run on Ray SIGKILLed mid-way
and resumed: tests/test_rl_loop.py, whose PPO run is that one.)

Runs are tiny (2 prompts x 2 completions of at most 4 tokens per iteration) so the module stays cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_llmc
from workloads.common.recipe import RecipeError
from workloads.kinds import load_recipe
from workloads.serve.objectstore import free_port

PPO = REPO / "workloads/configs/tiny-ppo.yaml"
# length_penalty's scores vary with each completion's length, so every iteration has advantages to learn from.
TINY = ["rl.prompts_per_iteration=2", "rl.group_size=2", "rl.max_new_tokens=4", "train.learning_rate=1e-2",
        "rewards=[{function: length_penalty, args: {limit: 8}}]"]
IN_PROCESS = ["scaling.num_workers=1", "deepspeed.enabled=false"]  # a trainer in this process, without Ray
TIMINGS = {"generation_s", "scoring_s", "logprobs_s", "training_s", "weight_sync_s", "iteration_s"}  # vary by run


def _trainer(model_dir, *overrides: str, two_workers: bool = False):
    """The shipped PPO recipe's trainer, made tiny: in this process alone, or (`two_workers`) as one of the recipe's
    two DeepSpeed workers."""
    from workloads.align.prompts import split_prompts
    from workloads.align.rl import RLTrainer

    recipe = load_recipe(PPO, [*TINY, *([] if two_workers else IN_PROCESS), *overrides], kind="align")
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


def two_worker_resume(model_dir: str, out: str, rank: int, port: int) -> None:
    """One of two workers (a process each, a gloo group, the shipped recipe's DeepSpeed ZeRO-2 policy): 2 iterations
    with a checkpoint after each, then a fresh trainer resumed from the first; rank 0 writes both runs' rows."""
    import torch.distributed as dist

    from workloads.align import rl, rl_checkpoints

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    overrides = ("rl.iterations=2", "rl.eval_prompts=0", "train.checkpoint_every=1")
    uninterrupted, written = _trainer(model_dir, *overrides, two_workers=True), []
    rows = rl.train(uninterrupted, checkpoint=lambda rows: written.append(rl_checkpoints.write_checkpoint(
        uninterrupted, {"iteration": rows[-1]["iteration"], "rows": rows, "restarts": []}, Path(out), keep=2)))
    resumed = _trainer(model_dir, *overrides, two_workers=True)
    again = rl.train(resumed, rows=resumed.load_checkpoint(written[0])["rows"])
    torch.save(uninterrupted.critic.state_dict(), Path(out) / f"critic-{rank}.pt")
    if rank == 0:
        (Path(out) / "rows.json").write_text(json.dumps({"uninterrupted": rows, "resumed": again}))
    dist.destroy_process_group()


@pytest.mark.slow  # DeepSpeed
def test_two_deepspeed_workers_resumed_from_a_checkpoint_continue_as_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """Each worker restores its own generators (it sampled its own completions and shuffled its own minibatches with
    them) and every worker's critic started as rank 0's (the one a checkpoint keeps), so the resumed iteration 2, a
    mean over both workers, is the uninterrupted run's to the bit."""
    from workloads.align import rl

    port = free_port()
    workers = [subprocess.Popen([sys.executable, "-c", "from tests.test_rl_resume import two_worker_resume; "
                                 f"two_worker_resume({str(tiny_model_dir)!r}, {str(tmp_path)!r}, {rank}, {port})"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for rank in (0, 1)]
    printed = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(p[-3000:] for p in printed)
    first = tmp_path / "checkpoint_000001"
    saved = [torch.load(first / rl.RNG_STATE.format(rank=rank), weights_only=True)["cpu"] for rank in (0, 1)]
    assert not torch.equal(saved[0], saved[1])  # two workers, two generators
    critics = [torch.load(tmp_path / f"critic-{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(critics[0][k], critics[1][k]) for k in critics[0])  # one critic, started alike everywhere
    runs = json.loads((tmp_path / "rows.json").read_text())
    assert [r["iteration"] for r in runs["resumed"]] == [0, 1, 2]
    assert _without_timings(runs["resumed"]) == _without_timings(runs["uninterrupted"])


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
