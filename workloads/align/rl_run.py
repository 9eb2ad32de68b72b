"""`llmc align` for the RL methods on Ray: the driver and the Train worker around `workloads.align.rl.RLTrainer`.

The driver checks prompts, rewards and any checkpoint to resume before any cluster work, connects, starts the rollout
engines (`rl.rollout: vllm`: `rl.engine.engines` vLLM engines as Ray actors in a placement group of their own, as
OpenRLHF places its engines), and runs the loop on `scaling.num_workers` Ray Train workers (`rl_worker`; the
policy in a DeepSpeed engine with `deepspeed.enabled`). Rank 0's row of every iteration reaches the driver as a
report, for the progress bar and the log lines. A failed worker group restarts from the newest checkpoint, up to
`run.max_failures` times (not for an error a restart cannot fix: `cluster.train.restart_fixes`); before each restart
every engine is checked and a dead one replaced by a new one, which the restarted workers give the checkpoint's
weights before their first rollout. Then the driver writes summary.json, metrics.csv and curves.png; the workers have
written the adapter (or model) and PPO's value head into the run directory.

Checkpoints are the loop's own (`workloads.align.rl_checkpoints`), in `<run.storage_path or run dir/checkpoints>/
<run.name>`, a directory every worker must see (one machine, or a shared mount: `workloads.common.multinode` checks).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cluster import actors
from cluster import train as cluster_train
from workloads.align import rl
from workloads.align.plan import rl_engine_bundles
from workloads.align.preference import deal
from workloads.align.prompts import split_prompts
from workloads.align.recipe import AlignRecipe
from workloads.align.rl_checkpoints import (
    checkpoint_dir,
    clear_checkpoints,
    list_checkpoints,
    resume_source,
    write_checkpoint,
)
from workloads.common import multinode, reporting
from workloads.common.collectives import sum_across
from workloads.common.paths import PATHS_CHECKED, resolve_path
from workloads.common.run import RESUME_LATEST
from workloads.finetune.driver import worker_scaling
from workloads.models.loading import resolve_model_path
from workloads.models.lora import merge_adapter

ENGINE_ROLE = "rollout-engine"


def run(recipe: AlignRecipe, run_dir: Path, address: str | None = None, show: bool = True) -> dict:
    """Train as the recipe says; returns the summary also written to `<run dir>/summary.json` (`show` prints it as
    a table too)."""
    from cluster.runtime import connect

    train_prompts, held_out = split_prompts(recipe.data, recipe.train.seed)  # bad rows fail here, naming them
    checkpoints = checkpoint_dir(recipe, run_dir)
    source = resume_source(recipe, checkpoints)  # a checkpoint that is missing or does not fit fails here
    model_path = resolve_model_path(recipe.model)
    engine = _engine_recipe(recipe)  # an adapter rank no engine serves fails here
    run_dir.mkdir(parents=True, exist_ok=True)
    reporting.save_recipe(recipe, run_dir)
    if recipe.run.resume_from != RESUME_LATEST:  # a new run: an earlier one's checkpoints are not its own
        clear_checkpoints(checkpoints, spare=source)
    s = recipe.scaling
    print(f"[llmc] {recipe.method} on {recipe.model.name} ({model_path}): {len(train_prompts)} training prompts, "
          f"{s.num_workers} Train worker(s)" + (f", DeepSpeed ZeRO-{recipe.deepspeed.stage}" if
                                                recipe.deepspeed.enabled else "")
          + f"; rollouts: {rl.ROLLOUTS[recipe.rl.rollout]}"
          + (f" ({recipe.rl.engine.engines} engine actor(s))" if engine else ""), flush=True)
    print(f"[llmc] {connect(address)}", flush=True)
    multinode.check_training(recipe.run.storage_path, str(checkpoints), model_path, _worker_reads(recipe),
                             {"run.output_dir": str(run_dir)})  # engines load the synced weights from the run dir
    if source is not None:
        resumed = json.loads((source / rl.TRAINER_STATE).read_text())["iteration"]
        print(f"[llmc] resumed from {source}: iteration {resumed}", flush=True)
    started = time.perf_counter()
    engines: list[actors.ActorGroup] = []  # started by the first attempt, checked before every restart

    def prepare() -> dict:
        """Each attempt's engines: started at first; on a restart each checked, a dead one replaced."""
        if engine is None:
            return {"engines": []}
        if not engines:  # not waited for: they start while the Train workers do
            engines.append(_start_engines(recipe, engine, model_path))
            return {"engines": engines[0].handles}
        for index in actors.ensure(engines[0]):
            print(f"[llmc] rollout engine {index} was lost: a new one starts, given the restored policy's weights",
                  flush=True)
        return {"engines": engines[0].handles}

    config = {"recipe": recipe.model_dump(mode="json"), "model_path": model_path, "run_dir": str(run_dir),
              "checkpoints": str(checkpoints), "source": str(source) if source else None}
    try:
        with _Progress(recipe) as progress:
            cluster_train.fit(rl_worker, config, name=recipe.run.name, storage_path=str(checkpoints.parent / ".ray"),
                              scaling=worker_scaling(recipe),  # type: ignore[arg-type]
                              max_failures=recipe.run.max_failures, on_report=progress.update,
                              shared={"train_prompts": worker_prompts(recipe, train_prompts), "held_out": held_out},
                              prepare=prepare)
    finally:
        for group in engines:
            actors.stop(group)
    final = list_checkpoints(checkpoints)[-1]  # the loop always checkpoints after its last iteration
    state = json.loads((final / rl.TRAINER_STATE).read_text())
    return write_outputs(recipe, run_dir, model_path, state, final, time.perf_counter() - started, show)


def worker_prompts(recipe: AlignRecipe, prompts: list) -> cluster_train.PerRank:
    """The training prompts dealt into one shard per worker (`fit(shared=...)` hands each worker its own)."""
    return cluster_train.per_rank(deal(prompts, recipe.scaling.num_workers))


def rl_worker(config: dict) -> None:
    """One Ray Train worker: the trainer (its shard of the prompts, the shared engines), resumed from the newest
    checkpoint of this run if there is one (a restart), else from the one `run.resume_from` named; the loop, each
    row reported; rank 0 saves the policy into the run directory."""
    recipe = AlignRecipe.model_validate(config["recipe"], context=PATHS_CHECKED)  # its prompts came with `config`
    rank, local_rank, _ = cluster_train.world()
    torch.set_num_threads(max(1, int(recipe.scaling.cpus_per_worker)))
    device = torch.device("cpu")
    if recipe.scaling.use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    run_dir, checkpoints = Path(config["run_dir"]), Path(config["checkpoints"])
    engines = [actors.Remote(handle) for handle in config["engines"]] or None
    trainer = rl.RLTrainer(recipe, config["model_path"], config["train_prompts"], config["held_out"],
                           work_dir=run_dir, engines=engines, device=device)
    train_prompts = int(sum_across([len(trainer.train_prompts)])[0])  # every worker's shard
    try:
        named = Path(config["source"]) if config["source"] else None
        found = list_checkpoints(checkpoints)
        source = found[-1] if found else named
        rows, restarts = None, []
        if source is not None:
            state = trainer.load_checkpoint(source)
            via = "resume_from" if source == named else "restart"
            rows, restarts = state["rows"], [*state["restarts"], {"from_iteration": state["iteration"], "via": via}]

        def checkpoint(rows: list[dict]) -> Path:
            state = {"iteration": rows[-1]["iteration"], "rows": rows, "restarts": restarts,
                     "train_prompts": train_prompts, "held_out_prompts": len(trainer.held_out)}
            return write_checkpoint(trainer, state, checkpoints, recipe.train.keep_checkpoints)

        rl.train(trainer, on_row=cluster_train.report, rows=rows, checkpoint=checkpoint)
        if rank == 0:
            trainer.save(run_dir)
        rl.barrier()
    finally:
        trainer.sampler.close()


class _Progress:
    """Iterations as a progress bar, and every train.log_every-th row as a log line, from rank 0's reports."""

    def __init__(self, recipe: AlignRecipe):
        from tqdm import tqdm

        self.recipe = recipe
        self._bar = tqdm(total=recipe.rl.iterations, desc=recipe.method, unit="iter", dynamic_ncols=True, leave=True)

    def update(self, row: dict) -> None:
        self._bar.n = int(row["iteration"])  # a restart from a checkpoint moves it back
        if "mean_reward" in row:
            self._bar.set_postfix({"reward": f"{row['mean_reward']:.3f}", "kl": f"{row['kl']:.3f}"}, refresh=False)
        self._bar.refresh()
        line = rl.progress_line(self.recipe, row)
        if line:
            self._bar.write(line)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


def _worker_reads(recipe: AlignRecipe) -> dict[str, str]:
    """The local paths the workers read themselves, by recipe field: the start adapter and reward models (the
    prompts are handed to them)."""
    paths = {f"rewards.{i}.model": term.model for i, term in enumerate(recipe.rewards) if term.model is not None}
    if recipe.rl.adapter is not None:
        paths["rl.adapter"] = recipe.rl.adapter
    return {field: str(resolve_path(path) or path) for field, path in paths.items()}


def _engine_recipe(recipe: AlignRecipe):
    """rl.rollout vllm's engine as a serve recipe (checked before any cluster work); None for generate."""
    if recipe.rl.rollout != "vllm":
        return None
    from workloads.align.vllm_rollout import engine_recipe, policy_lora_rank

    return engine_recipe(recipe, policy_lora_rank(recipe))


# A rollout engine actor is a process of its own already: a second one for vLLM's engine core, importing vLLM and
# torch again, made a tiny engine's start about 3x slower on 2 cores (41-54 s against 12-16 s in-process).
ENGINE_ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _start_engines(recipe: AlignRecipe, engine, model_path: str) -> actors.ActorGroup:
    """`rl.engine.engines` vLLM engine actors, each on `tensor_parallel_size` bundles of one placement group."""
    from workloads.align.vllm_rollout import RolloutEngine

    e = recipe.rl.engine
    bundles = rl_engine_bundles(recipe)
    # One GPU engine shards over its bundles through vLLM's own Ray workers; its actor then holds no GPU itself.
    own = {"CPU": e.cpus_per_engine} if recipe.scaling.use_gpu and e.tensor_parallel_size > 1 else None
    # The engines start while the Train workers do: a worker's first call waits for its engine. Each runs vLLM's
    # engine core in its own process, not a spawned one (ENGINE_ACTOR_ENV).
    return actors.start(RolloutEngine, e.engines, bundles, args=(engine, model_path), actor_resources=own,
                        strategy=recipe.scaling.placement_strategy, name=f"{recipe.run.name}-{ENGINE_ROLE}",
                        wait=False, env_vars=ENGINE_ACTOR_ENV)


def write_outputs(recipe: AlignRecipe, run_dir: Path, model_path: str, state: dict, final: Path, wall: float,
                  show: bool = True) -> dict:
    """summary.json, metrics.csv and curves.png from the last checkpoint's rows (the artifact is the workers')."""
    rows, restarts = state["rows"], state["restarts"]
    artifact = run_dir / ("adapter" if recipe.train.method == "lora" else "model")
    merged = None
    if recipe.run.merge_adapter:
        merged = str(merge_adapter(model_path, artifact, run_dir / "merged", recipe.model))
    summary = summarize(recipe, rows, state)
    summary |= {"model": recipe.model.name, "base_model_path": model_path, "train_method": recipe.train.method,
                "start_adapter": recipe.rl.adapter, "wall_seconds": wall, "artifact": str(artifact),
                "merged": merged, "restarts": restarts, "checkpoint": str(final)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    reporting.write_csv(rows, run_dir / "metrics.csv")
    plot_curves(rows, run_dir / "curves.png", recipe.method)
    if show:
        reporting.print_summary(f"{recipe.method} summary", summary, run_dir)
    return summary


def summarize(recipe: AlignRecipe, rows: list[dict], state: dict) -> dict:
    """What the run is judged by. initial/final_mean_reward: the held-out prompts' greedy answers before the first
    iteration and after the last (the first and last rollouts' when there are no held-out prompts); final_kl: the
    last rollout's mean per-completion KL to the reference."""
    iterations, evals = rows[1:], [r for r in rows if r.get("eval_reward") is not None]
    first_rollout, last_rollout = iterations[0]["mean_reward"], iterations[-1]["mean_reward"]
    return {"method": recipe.method,
            "initial_mean_reward": evals[0]["eval_reward"] if evals else first_rollout,
            "final_mean_reward": evals[-1]["eval_reward"] if evals else last_rollout,
            "final_kl": iterations[-1]["kl"], "final_kl_coef": iterations[-1]["kl_coef"],
            "first_rollout_reward": first_rollout, "last_rollout_reward": last_rollout,
            "iterations": len(iterations), "completions_per_iteration": recipe.rl.prompts_per_iteration
            * recipe.rl.group_size, "train_prompts": state["train_prompts"],
            "held_out_prompts": state["held_out_prompts"], "workers": recipe.scaling.num_workers,
            "deepspeed_stage": recipe.deepspeed.stage if recipe.deepspeed.enabled else None,
            "rewards": [t.model_dump(exclude_defaults=True) for t in recipe.rewards],
            "rollouts": rl.ROLLOUTS[recipe.rl.rollout],
            **{f"total_{phase}": sum(r[phase] for r in iterations) for phase in rl.PHASES}}


def plot_curves(rows: list[dict], path: Path, method: str) -> Path:
    """Two panels: mean reward per iteration (rollouts, and held-out greedy answers), and KL to the reference."""
    iterations, evals = rows[1:], [r for r in rows if r.get("eval_reward") is not None]
    fig, (left, right) = reporting.two_panels()
    left.plot([r["iteration"] for r in iterations], [r["mean_reward"] for r in iterations], label="rollouts")
    left.plot([r["iteration"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="held-out (greedy)")
    left.set(xlabel="iteration", ylabel="mean reward")
    right.plot([r["iteration"] for r in iterations], [r["kl"] for r in iterations], color="tab:red")
    right.set(xlabel="iteration", ylabel="KL to the reference (per completion)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend()
    return reporting.save_figure(fig, path, f"{method}: reward and KL")
