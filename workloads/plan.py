"""What a recipe will ask of a cluster, computed without Ray, torch or a model: `llmc validate` prints it.

Holds `deepspeed_config`, a pure function of the recipe, so GPU recipes are checked on a laptop.
"""

from __future__ import annotations

from workloads.config import FinetuneRecipe


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
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.learning_rate,
                "weight_decay": train.weight_decay,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                # torch's AdamW needs no compiled kernel; offload switches DeepSpeed to its CPU Adam.
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": recipe.model.dtype == "bfloat16"},
        "fp16": {"enabled": recipe.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def finetune_plan(recipe: FinetuneRecipe) -> dict:
    """Workers, placement bundles, total resources, batch math and the DeepSpeed config."""
    s, t = recipe.scaling, recipe.train
    bundle = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return {
        "workers": s.num_workers,
        "placement_bundles": [dict(bundle) for _ in range(s.num_workers)],
        "total_resources": {k: v * s.num_workers for k, v in bundle.items()},
        "accelerator_type": s.accelerator_type,
        "global_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * s.num_workers,
        "max_tokens_per_step": t.micro_batch_size * t.gradient_accumulation_steps * s.num_workers
        * recipe.data.max_length,
        "backend": f"deepspeed zero-{recipe.deepspeed.stage}" if recipe.deepspeed.enabled else "ddp",
        "deepspeed_config": deepspeed_config(recipe, s.num_workers) if recipe.deepspeed.enabled else None,
    }
