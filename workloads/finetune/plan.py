"""What a recipe will ask of a cluster, computed without Ray, torch or a model: `llmc validate` prints it.

Holds `deepspeed_config`, a pure function of the recipe, so GPU recipes are checked on a laptop.
"""

from __future__ import annotations

from workloads.config import FinetuneRecipe, ServeRecipe


def deepspeed_config(recipe: FinetuneRecipe, world_size: int) -> dict:
    """The DeepSpeed JSON config a recipe asks for (ZeRO stage, offload, precision, batch math)."""
    ds, train = recipe.deepspeed, recipe.train
    on_gpu = recipe.scaling.use_gpu
    zero: dict = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, overlap_comm=on_gpu)
    if ds.stage >= 2:
        zero.update(contiguous_gradients=True, reduce_scatter=True)
    # An 8-bit bitsandbytes optimizer is built by the Strategy and handed to deepspeed.initialize instead.
    optimizer = {
        "type": "AdamW",
        "params": {
            "lr": train.learning_rate,
            "weight_decay": train.weight_decay,
            "betas": list(train.adam_betas),
            "eps": train.adam_eps,
            # torch's AdamW needs no compiled kernel. With the optimizer offloaded its step runs on the host, where
            # DeepSpeedCPUAdam (compiled with ninja on first use) is the fast one: DeepSpeed reads torch_adam first.
            "torch_adam": not ds.offload_optimizer,
        },
    } if train.optimizer == "adamw" else None
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        **({"optimizer": optimizer} if optimizer else {}),
        "bf16": {"enabled": recipe.model.dtype == "bfloat16"},
        "fp16": {"enabled": recipe.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def accelerator_resource(accelerator_type: str | None) -> dict[str, float]:
    """The custom resource Ray uses to pin work to a GPU type (`accelerator_type:A100`); nodes offer 1 of it."""
    return {f"accelerator_type:{accelerator_type}": 0.001} if accelerator_type else {}


def train_worker_resources(recipe: FinetuneRecipe) -> dict[str, float]:
    """What one training worker holds: the one place this is computed (the plan and the run both use it)."""
    s = recipe.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}


def finetune_plan(recipe: FinetuneRecipe) -> dict:
    """Workers, placement bundles (as Ray Train asks for them), total resources, batch math, DeepSpeed config."""
    s, t = recipe.scaling, recipe.train
    bundle = {**train_worker_resources(recipe), **accelerator_resource(s.accelerator_type)}
    return {
        "workers": s.num_workers,
        "placement_bundles": [dict(bundle) for _ in range(s.num_workers)],
        "placement_strategy": s.placement_strategy,
        "total_resources": {k: round(v * s.num_workers, 3) for k, v in bundle.items()},
        "accelerator_type": s.accelerator_type,
        "global_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * s.num_workers,
        "max_tokens_per_step": t.micro_batch_size * t.gradient_accumulation_steps * s.num_workers
        * recipe.data.max_length,
        "backend": f"deepspeed zero-{recipe.deepspeed.stage}" if recipe.deepspeed.enabled else "ddp",
        "deepspeed_config": deepspeed_config(recipe, s.num_workers) if recipe.deepspeed.enabled else None,
    }


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
            "engine_resources": {k: round(v, 3) for k, v in _sum_bundles(engines).items()},
            "total_resources": {k: round(v, 3) for k, v in _sum_bundles([train_total, *engines]).items()}}


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------

# Ray Serve LLM's replica actor takes 1 CPU and shares its replica's first placement bundle.
SERVE_REPLICA_ACTOR_CPUS = 1
SERVE_INGRESS_CPUS = 0.5


def serve_engine_kwargs(recipe: ServeRecipe) -> dict:
    """vLLM engine arguments from the recipe (the model path is added by the caller)."""
    e, on_gpu = recipe.engine, recipe.resources.use_gpu
    kwargs = {
        "dtype": recipe.model.dtype,
        "max_model_len": e.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        "enable_prefix_caching": e.enable_prefix_caching,
        "enforce_eager": e.enforce_eager,
        "seed": e.seed,
        "trust_remote_code": False,
    }
    if e.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = e.max_num_batched_tokens
    if on_gpu:
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
    if recipe.adapters.enabled:
        kwargs.update(enable_lora=True, max_lora_rank=recipe.adapters.max_lora_rank,
                      max_loras=recipe.adapters.max_adapters_per_replica)
    return kwargs


def serve_frontend_kwargs(recipe: ServeRecipe) -> dict:
    """vLLM OpenAI-server arguments (Ray Serve LLM takes them among engine_kwargs): tool calling when asked for."""
    parser = recipe.engine.tool_call_parser
    return {"enable_auto_tool_choice": True, "tool_call_parser": parser} if parser else {}


def serve_engine_env(recipe: ServeRecipe) -> dict[str, str]:
    """Environment the engine needs: on CPU the KV-cache size is an environment variable."""
    return {} if recipe.resources.use_gpu else {"VLLM_CPU_KVCACHE_SPACE": f"{recipe.engine.kv_cache_gib:g}"}


def serve_bundle_per_worker(recipe: ServeRecipe) -> dict:
    """What each engine worker of a replica holds: CPUs, GPUs and the recipe's custom resources."""
    r = recipe.resources
    return {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.use_gpu else {}), **r.custom}


def serve_deployment_config(recipe: ServeRecipe) -> dict:
    """Ray Serve deployment options of the model deployment: autoscaling and backpressure."""
    a = recipe.autoscaling
    return {
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": a.min_replicas if a.initial_replicas is None else a.initial_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        },
        "max_ongoing_requests": a.max_ongoing_requests,
        "max_queued_requests": a.max_queued_requests,
    }


def serve_plan(recipe: ServeRecipe) -> dict:
    """Placement bundles per replica and total resources at min and max replicas, as Ray Serve LLM will ask."""
    e, r, a = recipe.engine, recipe.resources, recipe.autoscaling
    workers = e.tensor_parallel_size * e.pipeline_parallel_size
    worker = {**serve_bundle_per_worker(recipe), **accelerator_resource(r.accelerator_type)}
    bundles = [dict(worker) for _ in range(workers)]
    bundles[0]["CPU"] = bundles[0]["CPU"] + SERVE_REPLICA_ACTOR_CPUS
    per_replica = _sum_bundles(bundles)
    ingress = {"CPU": SERVE_INGRESS_CPUS * recipe.server.ingress_replicas}

    def total(replicas: int) -> dict:
        out = {k: v * replicas for k, v in per_replica.items()}
        out["CPU"] = out.get("CPU", 0) + ingress["CPU"]
        return {k: round(v, 3) for k, v in out.items()}

    return {
        "engine_workers_per_replica": workers,
        "placement_bundles_per_replica": bundles,
        "placement_strategy": r.placement_strategy,
        "resources_per_replica": {k: round(v, 3) for k, v in per_replica.items()},
        "ingress_resources": ingress,
        "replicas": {"min": a.min_replicas, "max": a.max_replicas},
        "total_resources_at_min_replicas": total(a.min_replicas),
        "total_resources_at_max_replicas": total(a.max_replicas),
        "max_concurrent_sequences_at_max_replicas": e.max_num_seqs * a.max_replicas,
        "engine_kwargs": serve_engine_kwargs(recipe),
        "deployment_config": serve_deployment_config(recipe),
        "auth": _auth_summary(recipe),
    }


def _sum_bundles(bundles: list[dict]) -> dict:
    out: dict = {}
    for bundle in bundles:
        for key, value in bundle.items():
            out[key] = out.get(key, 0) + value
    return out


def _auth_summary(recipe: ServeRecipe) -> str:
    s = recipe.server
    sources = ([f"{len(s.api_keys)} key(s) in the recipe"] if s.api_keys else []) + (
        [f"${s.api_key_env}"] if s.api_key_env else [])
    return "keys from " + " and ".join(sources) if sources else "no keys: open to anyone who can reach the host"
