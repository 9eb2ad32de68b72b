"""Optimizers and precision on a real `Strategy` in one process (the plain DDP path): bitsandbytes 8-bit AdamW,
and bf16 mixed precision (fp32 master weights, bf16 compute under autocast); the schema rules around them."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO
from workloads.bundled import make_arithmetic as arithmetic
from workloads.common.recipe import RecipeError
from workloads.data.formats import collate, tokenize_chat
from workloads.finetune.plan import deepspeed_config
from workloads.finetune.strategy import Strategy, weights_dtype
from workloads.kinds import load_recipe
from workloads.models.loading import load_model, load_tokenizer
from workloads.models.lora import attach_lora

TINY = REPO / "workloads/configs/tiny-lora.yaml"
CPU = torch.device("cpu")


def strategy_for(model_dir, *overrides: str) -> tuple[Strategy, dict]:
    """A one-process Strategy for the tiny LoRA recipe with `overrides`, and one batch of bundled-style sums."""
    recipe = load_recipe(TINY, ["deepspeed.enabled=false", "scaling.num_workers=1", *overrides])
    tokenizer = load_tokenizer(str(model_dir))
    model = attach_lora(load_model(str(model_dir), dtype=weights_dtype(recipe)), recipe.lora)
    chats = [arithmetic.task_prompt(a, b) + [{"role": "assistant", "content": arithmetic.answer(a, b)}]
             for a, b in [(3, 4), (12, 30), (55, 21), (9, 90)]]
    examples = [tokenize_chat(chat, tokenizer, 64) for chat in chats]
    return Strategy(model, recipe, world_size=1, device=CPU, total_steps=20), collate(examples, tokenizer.pad_token_id)


def test_adamw_8bit_keeps_8bit_state_and_lowers_the_loss(tiny_model_dir):
    import bitsandbytes as bnb

    strategy, batch = strategy_for(tiny_model_dir, "train.optimizer=adamw_8bit", "lora.r=64")
    assert isinstance(strategy.optimizer, bnb.optim.AdamW8bit)
    losses = [strategy.train_step([batch])[0] for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
    big = [s for s in strategy.optimizer.state.values() if "state1" in s and s["state1"].numel() >= 4096]
    assert big and all(s["state1"].dtype == torch.uint8 for s in big)  # moments quantized to 8 bits


def test_bf16_on_ddp_is_mixed_precision_fp32_master_weights_bf16_compute(tiny_model_dir):
    strategy, batch = strategy_for(tiny_model_dir, "model.dtype=bfloat16")
    trainable = {n: p for n, p in strategy.module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    computed = []
    layer = next(m for m in strategy.module.modules() if isinstance(m, torch.nn.Linear))
    handle = layer.register_forward_hook(lambda module, args, out: computed.append(out.dtype))
    loss, _ = strategy.train_step([batch])
    handle.remove()
    assert computed and set(computed) == {torch.bfloat16}  # the matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in strategy.module.parameters())  # the weights stayed fp32
    assert torch.isfinite(torch.tensor(loss)) and any(not torch.equal(before[n], p) for n, p in trainable.items())


def test_deepspeed_keeps_the_recipe_dtype_and_an_8bit_optimizer_is_a_client_optimizer():
    ds = load_recipe(TINY, ["model.dtype=bfloat16"])
    assert weights_dtype(ds) == "bfloat16" and deepspeed_config(ds, 2)["bf16"] == {"enabled": True}
    eight = load_recipe(TINY, ["train.optimizer=adamw_8bit"])
    assert "optimizer" not in deepspeed_config(eight, 2)  # handed to deepspeed.initialize, not named in the config
    assert deepspeed_config(load_recipe(TINY), 2)["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize(("overrides", "says"), [
    (["train.optimizer=paged_adamw_8bit"], "scaling.use_gpu"),
    (["train.optimizer=adamw_8bit", "deepspeed.stage=3", "deepspeed.offload_optimizer=true"],
     "deepspeed.offload_optimizer"),
    (["train.optimizer=sgd"], "'adamw', 'adamw_8bit' or 'paged_adamw_8bit'"),
])
def test_optimizer_rules_name_their_fields(overrides, says):
    with pytest.raises(RecipeError, match="train.optimizer") as info:
        load_recipe(TINY, overrides)
    assert says in str(info.value)
