"""RL (ppo, grpo, rloo) checkpoint directories: where they go, which are complete, which one a run resumes from, and
writing one from every worker so that a run killed meanwhile leaves none half-written. Plain files, no Ray: the driver
(workloads.align.rl_run), its Train workers and a single-process loop all use them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from workloads.align import rl
from workloads.align.recipe import AlignRecipe
from workloads.common.recipe import RecipeError
from workloads.common.run import RESUME_LATEST


def checkpoint_dir(recipe: AlignRecipe, run_dir: Path) -> Path:
    """Where the run's checkpoints go, as fine-tuning's: `run.storage_path` (else `<run dir>/checkpoints`)/run.name."""
    return Path(recipe.run.storage_path or run_dir / "checkpoints").resolve() / recipe.run.name


def list_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in `directory`, oldest first (one being written is a hidden temporary directory)."""
    found = directory.glob(f"{rl.CHECKPOINT}*") if directory.is_dir() else []
    complete = (p for p in found if (p / rl.TRAINER_STATE).is_file())
    return sorted(complete, key=lambda p: int(p.name[len(rl.CHECKPOINT):]))


def resume_source(recipe: AlignRecipe, directory: Path) -> Path | None:
    """The checkpoint `run.resume_from` names (`latest`: the newest in `directory`), checked to fit the recipe;
    None when the run starts fresh."""
    wanted = recipe.run.resume_from
    if wanted is None:
        return None
    if wanted == RESUME_LATEST:
        found = list_checkpoints(directory)
        if not found:
            raise RecipeError(f"field 'run.resume_from': no checkpoint of run {recipe.run.name!r} to resume in "
                              f"{directory}")
        source = found[-1]
    else:
        source = Path(wanted).expanduser().resolve()
        if not (source / rl.TRAINER_STATE).is_file():
            raise RecipeError(f"field 'run.resume_from': {wanted} is not an RL (ppo, grpo, rloo) checkpoint "
                              f"(no {rl.TRAINER_STATE})")
    state = json.loads((source / rl.TRAINER_STATE).read_text())
    if (state["method"], state["train_method"]) != (recipe.method, recipe.train.method):
        raise RecipeError(f"field 'run.resume_from': {source} is a checkpoint of {state['method']} "
                          f"({state['train_method']}); this recipe runs {recipe.method} ({recipe.train.method})")
    if state["iteration"] > recipe.rl.iterations:
        raise RecipeError(f"field 'rl.iterations': {source} is at iteration {state['iteration']}, past "
                          f"rl.iterations ({recipe.rl.iterations})")
    return source


def write_checkpoint(trainer: rl.RLTrainer, state: dict, directory: Path, keep: int) -> Path:
    """A checkpoint of iteration `state["iteration"]` (every worker calls this), written into a hidden directory beside
    it and renamed into place by rank 0, so a run killed meanwhile leaves none half-written; then only the newest
    `keep` stay."""
    final = directory / f"{rl.CHECKPOINT}{state['iteration']:06d}"
    partial = directory / f".{final.name}.partial"
    if trainer.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    rl.barrier()
    trainer.save_checkpoint(partial, state)
    if trainer.rank == 0:
        shutil.rmtree(final, ignore_errors=True)  # a replaced run's, of the same iteration
        partial.rename(final)
        for stale in [*directory.glob(f".{rl.CHECKPOINT}*"), *list_checkpoints(directory)[:-keep]]:
            shutil.rmtree(stale)  # older checkpoints, and what a killed run left half-written
    rl.barrier()
    return final


def clear_checkpoints(directory: Path, spare: Path | None = None) -> None:
    """A new run's start: an earlier run's checkpoints go (but `spare`, the one it resumes from, if among them)."""
    for path in directory.glob(f"*{rl.CHECKPOINT}*") if directory.is_dir() else []:
        if spare is None or path.resolve() != spare.resolve():
            shutil.rmtree(path)
