"""How a serve recipe becomes vLLM engine arguments, Ray Serve deployment options and resource bundles, and the plan
`llmc validate` prints for it."""

from __future__ import annotations

from workloads.common.resources import accelerator_resource, sum_bundles
from workloads.serve.recipe import ServeRecipe

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
    per_replica = sum_bundles(bundles)
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


def _auth_summary(recipe: ServeRecipe) -> str:
    s = recipe.server
    sources = ([f"{len(s.api_keys)} key(s) in the recipe"] if s.api_keys else []) + (
        [f"${s.api_key_env}"] if s.api_key_env else [])
    return "keys from " + " and ".join(sources) if sources else "no keys: open to anyone who can reach the host"
