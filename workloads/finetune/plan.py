"""What a recipe will ask of a cluster, computed without Ray, torch or a model: `llmc validate` prints it.

Holds `deepspeed_config`, a pure function of the recipe, so GPU recipes are checked on a laptop.
"""

from __future__ import annotations

from workloads.common.resources import accelerator_resource
from workloads.finetune.recipe import FinetuneRecipe


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


def validation_plan(recipe: FinetuneRecipe) -> dict:
    """What `llmc validate` prints for a fine-tuning recipe: its data files' rows, checked (structure only, no
    tokenizer; with data.streaming, the first `check_rows` of each), the data plan (sources, estimated rows, where
    tokenization runs), then `finetune_plan`."""
    from workloads.data.check import check_data, check_heads  # reads the data files: only when asked
    from workloads.data.plan import data_plan

    if recipe.data.streaming.enabled:
        checked = {"data_rows_checked": {r.path: r.rows for r in check_heads(recipe.data)}}
    else:
        checked = {"data_rows": {r.path: r.rows for r in check_data(recipe.data)}}
    return {**checked, "data_plan": data_plan(recipe.data), **finetune_plan(recipe)}
