"""`llmc align RECIPE`: the driver. Validate and read the pairs, connect, run the workers on Ray Train (each handed
its own shard of the training pairs, not reading the files again from its own disk), then write
the model or adapter, summary.json, metrics.csv and a curves PNG into the run directory. The RL methods have a driver
of their own (workloads.align.rl_run: Train workers and vLLM engine actors), with the same outputs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cluster import train as cluster_train
from workloads.align.preference import deal, split_pairs
from workloads.align.recipe import RL_METHODS, AlignRecipe
from workloads.align.rewards import import_rewards
from workloads.align.trainers import MODEL_DIR, STATE, train_worker
from workloads.common import multinode, reporting
from workloads.common.paths import resolve_path
from workloads.finetune.driver import note_checkpoints_on_stop, refuse_to_replace, worker_scaling
from workloads.models.loading import load_tokenizer, resolve_model_path
from workloads.models.lora import merge_adapter

# What each method's curves show beside the loss: (train metric, held-out metric, axis label).
_CURVES = {"reward": ("accuracy", "eval_accuracy", "pairwise accuracy"),
           "dpo": ("rewards_margins", "eval_rewards_margins", "chosen - rejected reward margin")}


def run(recipe: AlignRecipe, output_dir: str | None = None, address: str | None = None,
        overwrite: bool = False, show: bool = True) -> dict:
    """Train as the recipe says; returns the summary also written to `<run dir>/summary.json` (`show` prints it as
    a table too)."""
    from cluster.runtime import connect

    run_dir = recipe.output_dir(output_dir)
    refuse_to_replace(run_dir, recipe.run, overwrite, resumable=recipe.method in RL_METHODS)
    if recipe.method in RL_METHODS:
        from workloads.align import rl_run
        from workloads.align.rl_checkpoints import checkpoint_dir

        import_rewards(recipe.rewards)  # the run starts: only now does a reward module's code run
        with note_checkpoints_on_stop(str(checkpoint_dir(recipe, run_dir))):
            return rl_run.run(recipe, run_dir, address, show=show)
    train, held_out = split_pairs(recipe.data, recipe.train.seed)  # bad pairs fail here, naming field and row
    model_path = resolve_model_path(recipe.model)
    load_tokenizer(model_path, recipe.model.revision, recipe.model.chat_template)  # a missing model fails here
    run_dir.mkdir(parents=True, exist_ok=True)
    reporting.save_recipe(recipe, run_dir)
    print(f"[llmc] {recipe.method} on {recipe.model.name} ({model_path}): {len(train)} training pairs, "
          f"{len(held_out)} held out", flush=True)
    print(f"[llmc] {connect(address)}", flush=True)
    storage = recipe.run.storage_path or str(run_dir / "checkpoints")
    reads = {"dpo.adapter": str(resolve_path(recipe.dpo.adapter))} if recipe.dpo.adapter is not None else {}
    multinode.check_training(recipe.run.storage_path, storage, model_path, reads)  # the pairs go to the workers
    started = time.perf_counter()
    with note_checkpoints_on_stop(cluster_train.experiment_path(storage, recipe.run.name)), \
            reporting.TrainProgress(recipe.train.max_steps, description=recipe.method) as progress:
        result = cluster_train.fit(
            train_worker, {"recipe": recipe.model_dump(mode="json"), "model_path": model_path},
            shared={"train_pairs": cluster_train.per_rank(deal(train, recipe.scaling.num_workers, equal=True)),
                    "held_out_pairs": held_out}, name=recipe.run.name, storage_path=storage,
            scaling=worker_scaling(recipe),  # type: ignore[arg-type]
            max_failures=recipe.run.max_failures, keep_checkpoints=1,
            local_copy_to=run_dir / "final_checkpoint" if "://" in storage else None, on_report=progress.update,
        )
    if result.checkpoint_dir is None:
        raise RuntimeError(f"alignment finished without a checkpoint (storage {result.storage_dir})")
    return write_outputs(recipe, run_dir, model_path, result.checkpoint_dir, time.perf_counter() - started, show)


def write_outputs(recipe: AlignRecipe, run_dir: Path, model_path: str, checkpoint: Path, wall: float,
                  show: bool = True) -> dict:
    """The artifact (adapter/ for LoRA, model/ for full weights), summary.json, metrics.csv, curves.png."""
    state = json.loads((checkpoint / STATE).read_text())
    history, evals = state["history"], state["evals"]
    initial, final = evals[0], evals[-1]
    artifact = run_dir / ("adapter" if recipe.train.method == "lora" else "model")
    shutil.rmtree(artifact, ignore_errors=True)
    shutil.copytree(checkpoint / MODEL_DIR, artifact)
    merged = None
    if recipe.run.merge_adapter:
        merged = str(merge_adapter(model_path, artifact, run_dir / "merged", recipe.model))
    summary = {"method": recipe.method, **method_summary(recipe, state, initial, final),
               "initial_eval_loss": initial["eval_loss"], "final_eval_loss": final["eval_loss"],
               "initial_train_loss": history[0]["loss"], "final_train_loss": history[-1]["loss"],
               "steps": history[-1]["step"], "train_pairs": state["train_pairs"],
               "pairs_per_worker": state["pairs_per_worker"], "batches_per_worker": state["batches_per_worker"],
               "held_out_pairs": state["held_out_pairs"], "train_method": recipe.train.method,
               "model": recipe.model.name, "base_model_path": model_path, "workers": state["workers"],
               "deepspeed_stage": recipe.deepspeed.stage if recipe.deepspeed.enabled else None,
               "train_seconds": state["train"].get("train_runtime"), "wall_seconds": wall,
               "artifact": str(artifact), "merged": merged, "checkpoint": str(checkpoint)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    reporting.write_csv(history, run_dir / "metrics.csv")
    plot_curves(history, evals, run_dir / "curves.png", recipe.method)
    if show:
        reporting.print_summary(f"{recipe.method} summary", summary, run_dir)
    return summary


def method_summary(recipe: AlignRecipe, state: dict, initial: dict, final: dict) -> dict:
    """What each method's run is judged by, measured on the held-out pairs before the first step and after the last.

    reward: the saved model's pairwise accuracy (every held-out pair scored through `load_reward_model`).
    dpo: the implicit reward margin beta * (chosen - rejected log-ratio to the reference), which starts at 0 as the
    reference is the starting policy, and the policy's own chosen-minus-rejected log-likelihood margin.
    """
    if recipe.method == "reward":
        return {"heldout_pairwise_accuracy": state["heldout_pairwise_accuracy"],
                "initial_eval_accuracy": initial["eval_accuracy"], "final_eval_accuracy": final["eval_accuracy"],
                "final_eval_margin": final["eval_margin"]}
    return {"initial_margin": initial["eval_rewards_margins"], "final_margin": final["eval_rewards_margins"],
            "initial_logp_margin": initial["eval_logps_chosen"] - initial["eval_logps_rejected"],
            "final_logp_margin": final["eval_logps_chosen"] - final["eval_logps_rejected"],
            "final_reward_accuracy": final["eval_rewards_accuracies"], "beta": recipe.dpo.beta,
            "start_adapter": recipe.dpo.adapter}


def plot_curves(history: list[dict], evals: list[dict], path: Path, method: str) -> Path:
    """Two panels: train and held-out loss; the method's metric (accuracy or margin), train and held-out."""
    train_key, eval_key, label = _CURVES[method]
    fig, (left, right) = reporting.two_panels()
    for ax, (train, held_out, name) in zip((left, right), (("loss", "eval_loss", "loss"), (train_key, eval_key, label)),
                                           strict=True):
        ax.plot([r["step"] for r in history], [r.get(train) for r in history], label="train", linewidth=1)
        ax.plot([e["step"] for e in evals], [e.get(held_out) for e in evals], "o-", label="held-out")
        ax.set(xlabel="optimizer step", ylabel=name)
        ax.grid(alpha=0.3)
        ax.legend()
    return reporting.save_figure(fig, path, f"{method}: loss and {label}")


def main(argv: list[str] | None = None) -> int:
    """`python -m workloads.align RECIPE [--set K=V] [--output-dir DIR] [--overwrite] [--address A]`: a job."""
    from workloads.common.entrypoint import recipe_job

    return recipe_job(argv, prog="python -m workloads.align", description=__doc__.splitlines()[0], kind="align")
