"""The resource plan of an align recipe (`llmc validate` prints it): a reward or DPO run plans as a fine-tuning run
(the same workers, batch math and DeepSpeed config); PPO and GRPO add their vLLM engine bundles."""

from __future__ import annotations

from workloads.align.recipe import RL_METHODS
from workloads.common.resources import accelerator_resource, sum_bundles
from workloads.finetune.plan import finetune_plan


def rl_engine_bundles(recipe) -> list[dict[str, float]]:
    """PPO/GRPO with rl.rollout vllm: the rollout engines' placement bundles, engine after engine (on GPUs one per
    tensor-parallel shard, each with a GPU; the engine's actor sits in its first). None for rl.rollout generate."""
    if recipe.rl.rollout != "vllm":
        return []
    e, s = recipe.rl.engine, recipe.scaling
    gpu = {"GPU": 1, **accelerator_resource(s.accelerator_type)} if s.use_gpu else {}
    return [{"CPU": e.cpus_per_engine, **gpu} for _ in range(e.engines * (e.tensor_parallel_size if s.use_gpu else 1))]


def rl_plan(recipe) -> dict:
    """fine-tuning's plan of the policy's Train workers, the rollout engines' bundles (a placement group of their own),
    each worker's share of a rollout batch, and the resources of both together."""
    plan = finetune_plan(recipe)
    rl, engines = recipe.rl, rl_engine_bundles(recipe)
    train_total = plan.pop("total_resources")
    return {**plan, "train_resources": train_total,
            "prompts_per_worker": rl.prompts_per_iteration // recipe.scaling.num_workers,
            "completions_per_iteration": rl.prompts_per_iteration * rl.group_size,
            "rollout_engines": rl.engine.engines if engines else 0, "engine_bundles": engines,
            "engine_resources": {k: round(v, 3) for k, v in sum_bundles(engines).items()},
            "total_resources": {k: round(v, 3) for k, v in sum_bundles([train_total, *engines]).items()}}


def align_plan(recipe) -> dict:
    """`rl_plan` for the RL methods (PPO, GRPO), `finetune_plan` for reward and DPO."""
    return rl_plan(recipe) if recipe.method in RL_METHODS else finetune_plan(recipe)
