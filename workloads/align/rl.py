"""PPO, GRPO and RLOO (`llmc align` with `method: ppo | grpo | rloo`): one RL loop, the method a plug-in.

Each iteration: sample `rl.group_size` completions for each of `rl.prompts_per_iteration` training prompts, score
them with the recipe's rewards, take the policy's and the reference's log-probs of every completion token (and,
when the method trains a critic, the critic's values), let the method (workloads.align.methods: PPO's GAE over
per-token rewards, whitened; GRPO's normalization within each prompt's group; RLOO's leave-one-out baseline) turn
scores into advantages, then `rl.epochs` passes of clipped policy updates in minibatches, then the new weights go
to the sampler. The KL to the reference is charged in the reward or the loss, with a fixed or adaptive
coefficient. Held-out prompts are answered greedily and scored before the first iteration, every `train.eval_every`
and after the last.

Rollouts (and the held-out answers) come from `rl.rollout`: `generate`, the policy's own `model.generate`, or `vllm`,
vLLM engines (workloads.align.vllm_rollout: Ray actors under `llmc align`, else one in this process) given the
policy's weights after every update and after a checkpoint is restored, the seconds of that sync in each iteration's
`weight_sync_s`. The old log-probs the update is
clipped against are always recomputed by the policy's own forward, so the engine's numerics never enter the loss.

Every `train.checkpoint_every` iterations (and after the last) a checkpoint goes to `<run dir>/checkpoints/<run.name>/
checkpoint_<iteration>` (written beside it, then renamed into place; the newest `train.keep_checkpoints` kept): the
trained weights, the critic, optimizer, schedule, KL coefficient, prompt order, each worker's RNG states and the
metrics rows so far. `run.resume_from: latest | DIR` continues from the next iteration.

Plain PyTorch, no Ray: the trainer runs in one process, or as each of several Ray Train workers
(workloads.align.rl_run), which find each other through torch.distributed: each takes an equal share of every
iteration's prompts and of the held-out ones, its gradients are averaged with the others' (by the policy's DeepSpeed
engine with `deepspeed.enabled`, else by an all-reduce), and the metrics are means over all of them. A critic (PPO's)
is colocated: a head on each worker's policy, with its own optimizer, averaged the same way.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workloads.align.estimators import AdaptiveKLController, FixedKLController, masked_mean, token_kl
from workloads.align.methods import build_method
from workloads.align.policy import Policy, ValueHead, load_policy
from workloads.align.prompts import Prompt
from workloads.align.recipe import SCHEDULERS, AlignRecipe
from workloads.align.rewards import build_reward
from workloads.align.rollout import GenerateSampler, Rollout, token_outputs
from workloads.common.collectives import barrier, sum_, sum_across, world
from workloads.common.recipe import RecipeError
from workloads.finetune.plan import deepspeed_config
from workloads.finetune.strategy import verify_manifest, write_manifest
from workloads.models.loading import load_tokenizer

PHASES = ("generation_s", "scoring_s", "logprobs_s", "training_s", "weight_sync_s")  # seconds of each, per iteration
CHECKPOINT = "checkpoint_"  # + the iteration: one checkpoint directory
TRAINER_STATE = "trainer_state.json"  # in a checkpoint: iteration, metrics rows, KL coefficient, restarts
TENSORS = "trainer.pt"  # in a checkpoint: trained weights, critic, optimizer, schedule, prompt order
RNG_STATE = "rng-rank{rank}.pt"  # in a checkpoint: each worker's own random generators (CPU, CUDA, Python's)
ROLLOUTS = {"generate": "model.generate", "vllm": "vLLM engine"}  # what samples, by rl.rollout
DEEPSPEED_STATE = "deepspeed"  # in a checkpoint with deepspeed.enabled: the policy engine's own checkpoint


def mean_across(stats: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the workers (every worker holds an equal share of the batch)."""
    keys = sorted(stats)
    totals = sum_across([stats[k] for k in keys])
    return {k: v / world()[1] for k, v in zip(keys, totals, strict=True)}


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Data parallelism without an engine: every worker's gradients replaced by their mean over all workers."""
    size = world()[1]
    if size == 1:
        return
    for p in params:
        if p.grad is not None:
            sum_(p.grad)
            p.grad /= size


@dataclass
class Experience:
    """One iteration's rollout with everything the update needs, per completion (rows) or per token."""

    rollout: Rollout
    scores: torch.Tensor  # (rows,): the summed reward
    old_logprobs: torch.Tensor  # (rows, tokens): the policy's at sampling time
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # with a critic: its values, before each token
    advantages: torch.Tensor  # (rows,) or (rows, tokens), as the method gives them
    returns: torch.Tensor | None  # with a critic: its targets

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask


class RLTrainer:
    """setup (in __init__, in order), then `iteration()` as often as the recipe says, `evaluate()`, `save()`."""

    def __init__(self, recipe: AlignRecipe, model_path: str, train: list[Prompt], held_out: list[Prompt],
                 work_dir: Path | None = None, engines: list | None = None, device: torch.device | None = None):
        """`engines`: rl.rollout vllm's engines, shared by the workers (`cluster.actors.Remote` handles); without
        them, the sampler starts one in this process. `device`: where the policy computes (default: CPU)."""
        self.recipe, self.rl, self.method = recipe, recipe.rl, build_method(recipe)
        self.rank, self.world = world()
        self.device = device or torch.device("cpu")
        torch.manual_seed(recipe.train.seed)  # the same initial weights on every worker (a fresh LoRA, a critic)
        self.tokenizer = load_tokenizer(model_path, recipe.model.revision, recipe.model.chat_template)
        self.train_prompts = self._fitting(train)
        self.held_out = self._fitting(held_out)[: self.rl.eval_prompts]
        if not self.train_prompts:
            raise RecipeError(f"field 'data.max_length': no training prompt is under {recipe.data.max_length} - "
                              f"rl.max_new_tokens ({self.rl.max_new_tokens}) tokens")
        self.reward = build_reward(recipe.rewards, dtype=recipe.model.dtype)
        self.policy: Policy = load_policy(recipe, model_path)
        self.policy.model.to(self.device)
        self.critic = (ValueHead(self.policy.model.config.hidden_size).to(self.device) if self.method.needs_critic
                       else None)
        self.engine = None  # the policy's DeepSpeed engine, with deepspeed.enabled
        self.optimizer, self.scheduler = self._setup_optimizer()
        self.kl = (AdaptiveKLController(self.rl.kl.coef, self.rl.kl.target, self.rl.kl.horizon)
                   if self.rl.kl.target is not None else FixedKLController(self.rl.kl.coef))
        self.sampler = self._setup_sampler(model_path, work_dir, engines)
        self._order: list[int] = []
        self._rng = random.Random(recipe.train.seed)
        if self.rank:  # each worker samples its own completions with torch's global generator (rank 0 goes on)
            torch.manual_seed(recipe.train.seed + self.rank)

    def _fitting(self, prompts: list[Prompt]) -> list[tuple[Prompt, list[int]]]:
        """Each prompt with its chat-rendered token ids; prompts that leave no room for a completion are left out."""
        room = self.recipe.data.max_length - self.rl.max_new_tokens
        texts = [self.tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [(p, i) for p, i in zip(prompts, ids, strict=True) if len(i) <= room]

    def _setup_sampler(self, model_path: str, work_dir: Path | None, engines: list | None):
        """`rl.rollout`'s sampler: the policy's own generate, or vLLM engines holding the policy's weights (synced
        through `<work_dir>/rollout_weights`, a temporary directory without one)."""
        if self.rl.rollout == "generate":
            return GenerateSampler(self.tokenizer, self.rl.max_new_tokens, self.rl.temperature)
        from workloads.align.vllm_rollout import VLLMSampler

        directory = work_dir / "rollout_weights" if work_dir else Path(tempfile.mkdtemp(prefix="llmc-rollout-"))
        own = engines[self.rank % len(engines)] if engines else None
        return VLLMSampler(self.recipe, model_path, self.tokenizer, self.policy, directory, engine=own,
                           engines=engines, leader=self.rank == 0, barrier=barrier)

    def _setup_optimizer(self):
        """AdamW over the policy's trainable weights (and the critic's, at its own rate), the recipe's schedule over
        every optimizer step of the run. With deepspeed.enabled the policy's optimizer is its DeepSpeed engine's (which
        also averages its gradients over the workers), and the critic keeps a torch AdamW of its own."""
        from transformers import get_scheduler

        t = self.recipe.train
        rows = self.rl.prompts_per_iteration // self.world * self.rl.group_size
        steps = self.rl.iterations * self.rl.epochs * -(-rows // self.minibatch_size)

        def schedule(optimizer):
            return get_scheduler(SCHEDULERS[t.lr_scheduler], optimizer, t.warmup_steps, steps)

        groups = [] if self.recipe.deepspeed.enabled else [{"params": self.policy.parameters(), "lr": t.learning_rate}]
        if self.critic is not None:
            groups.append({"params": list(self.critic.parameters()), "lr": self.rl.critic_learning_rate})
        if self.recipe.deepspeed.enabled:
            self.engine = self._deepspeed_engine(schedule)
        if not groups:
            return None, None
        optimizer = torch.optim.AdamW(groups, betas=t.adam_betas, eps=t.adam_eps, weight_decay=t.weight_decay)
        return optimizer, schedule(optimizer)

    def _deepspeed_engine(self, schedule):
        """The policy wrapped by DeepSpeed (ZeRO 0-2, the recipe's config). Gradient accumulation is the loop's: each
        `backward` accumulates, each `step` is an optimizer step (managed_gradient_accumulation off)."""
        if not self.recipe.scaling.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        config = {**deepspeed_config(self.recipe, self.world), "managed_gradient_accumulation": False}  # type: ignore[arg-type]
        engine, _, _, _ = deepspeed.initialize(model=self.policy.model, model_parameters=self.policy.parameters(),
                                               config=config, lr_scheduler=schedule)
        return engine

    @property
    def minibatch_size(self) -> int:
        return self.recipe.train.micro_batch_size * self.recipe.train.gradient_accumulation_steps

    # -- one iteration: rollout, scoring, log-probs, advantages, update -------------------------------------------

    def iteration(self) -> dict:
        """One rollout batch and its updates; returns the iteration's metrics row (without its number): means over
        all workers, the phase times this worker's."""
        prompts = self._next_prompts()
        clock = time.perf_counter()
        rollout = self.sampler.sample(self.policy.model, [ids for _, ids in prompts], self.rl.group_size)
        generated = time.perf_counter()
        group = [p for p, _ in prompts for _ in range(self.rl.group_size)]
        scores, terms = self.reward.score([p.messages for p in group], rollout.completions,
                                          [p.reference for p in group])
        scored = time.perf_counter()
        experience, stats = self._make_experience(rollout.to(self.device),
                                                  torch.tensor(scores, device=self.device))
        measured = time.perf_counter()
        stats |= self._update(experience)
        stats = mean_across({"mean_reward": sum(scores) / len(scores),
                             **{f"reward_{name}": sum(v) / len(v) for name, v in terms.items()}, **stats,
                             "response_tokens": rollout.response_mask.sum(1).float().mean().item()})
        self.kl.update(stats["kl"], len(scores) * self.world)
        trained = time.perf_counter()
        self.sampler.sync(self.policy)  # the next rollout (and evaluation) samples from the updated policy
        return {**stats, "generation_s": generated - clock, "scoring_s": scored - generated,
                "logprobs_s": measured - scored, "training_s": trained - measured,
                "weight_sync_s": time.perf_counter() - trained}

    def _next_prompts(self) -> list[tuple[Prompt, list[int]]]:
        """This worker's share of the iteration's prompts (`prompts_per_iteration` / workers): the next of a seeded
        shuffle of its own training prompts (the driver dealt each worker a shard), reshuffled once used up."""
        share = self.rl.prompts_per_iteration // self.world
        while len(self._order) < share:
            self._order += self._rng.sample(range(len(self.train_prompts)), len(self.train_prompts))
        taken, self._order = self._order[:share], self._order[share:]
        return [self.train_prompts[i] for i in taken]

    @torch.no_grad()
    def _make_experience(self, rollout: Rollout, scores: torch.Tensor) -> tuple[Experience, dict]:
        """Log-probs (policy, reference), values, the KL estimate and the method's advantages of a scored rollout."""
        temperature, mask = self.rl.temperature, rollout.response_mask
        chunks = [torch.arange(i, min(i + self.recipe.train.micro_batch_size, len(scores)))
                  for i in range(0, len(scores), self.recipe.train.micro_batch_size)]
        policy = [token_outputs(self.policy.model, rollout.select(c), temperature, entropy=True,
                                hidden=self.critic is not None)
                  for c in chunks]
        with self.policy.reference() as reference:
            ref = torch.cat([token_outputs(reference, rollout.select(c), temperature).logprobs for c in chunks])
        old = torch.cat([o.logprobs for o in policy])
        values = torch.cat([self.critic(o.hidden) for o in policy]) * mask if self.critic is not None else None
        kl = token_kl(old, ref, self.rl.kl.estimator) * mask
        penalty = self.kl.value * kl if self.rl.kl.penalty == "reward" else torch.zeros_like(kl)
        advantages, returns = self.method.advantages(scores, penalty, mask, values)
        entropy = torch.cat([o.entropy for o in policy])
        stats = {"kl": kl.sum(1).mean().item(), "kl_coef": self.kl.value, "entropy": masked_mean(entropy, mask).item()}
        return Experience(rollout, scores, old, ref, values, advantages, returns), stats

    def _update(self, exp: Experience) -> dict:
        """`rl.epochs` shuffled passes over the experience, one optimizer step per minibatch; mean losses."""
        totals: dict[str, float] = {}
        steps = 0
        self.policy.model.train()
        for _ in range(self.rl.epochs):
            order = torch.randperm(len(exp.scores))
            for start in range(0, len(order), self.minibatch_size):
                minibatch = order[start : start + self.minibatch_size]
                tokens = exp.mask[minibatch].sum().clamp(min=1)
                for micro in minibatch.split(self.recipe.train.micro_batch_size):
                    loss, stats = self._loss(exp, micro)
                    loss = loss * exp.mask[micro].sum() / tokens  # each token weighs the same in a minibatch
                    if self.engine is not None:
                        self.engine.backward(loss, scale_wrt_gas=False)  # accumulates; `step` reduces
                    else:
                        loss.backward()
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value * len(micro) / len(minibatch)
                self._step()
                steps += 1
        self.policy.model.eval()
        return {key: value / steps for key, value in totals.items()}

    def _loss(self, exp: Experience, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The method's policy loss of some rows, with the entropy bonus, a KL term (penalty: loss) and, with a
        critic, the method's critic loss."""
        rl, mask = self.rl, exp.mask[rows]
        out = token_outputs(self.policy.model, exp.rollout.select(rows), rl.temperature,
                            entropy=rl.entropy_coef > 0, hidden=self.critic is not None)
        loss, clipped = self.method.policy_loss(out.logprobs, exp.old_logprobs[rows], exp.advantages[rows], mask)
        stats = {"policy_loss": loss.item(), "clip_fraction": clipped.item()}
        if rl.entropy_coef > 0:
            loss = loss - rl.entropy_coef * masked_mean(out.entropy, mask)
        if rl.kl.penalty == "loss":
            loss = loss + self.kl.value * masked_mean(token_kl(out.logprobs, exp.ref_logprobs[rows],
                                                               rl.kl.estimator), mask)
        if self.critic is not None:
            critic_loss = self.method.critic_loss(self.critic(out.hidden), exp.values[rows], exp.returns[rows], mask)
            stats["value_loss"] = critic_loss.item()
            loss = loss + critic_loss  # the critic reads detached hidden states: this trains only its head
        return loss, stats

    def _step(self) -> None:
        """Average the gradients over the workers, clip the policy's and the critic's separately (the critic's are
        larger early on), step. The DeepSpeed engine averages and clips the policy's itself."""
        if self.engine is not None:
            self.engine.step()
        else:
            average_gradients(self.policy.parameters())
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.recipe.train.max_grad_norm)
        if self.critic is not None:
            average_gradients(list(self.critic.parameters()))
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.recipe.train.max_grad_norm)
        if self.optimizer is not None:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    # -- evaluation, saving, checkpoints ------------------------------------------------------------------------

    def evaluate(self) -> float | None:
        """Mean reward of the greedy answers to the held-out prompts (each worker answers its share); None when
        there are none."""
        if not self.held_out:
            return None
        share = self.held_out[self.rank :: self.world]
        scores: list[float] = []
        if share:
            answers = self.sampler.sample(self.policy.model, [ids for _, ids in share], 1, greedy=True)
            scores, _ = self.reward.score([p.messages for p, _ in share], answers.completions,
                                          [p.reference for p, _ in share])
        total, count = sum_across([sum(scores), len(scores)])
        return total / count

    def save(self, run_dir: Path) -> Path:
        """The policy (run_dir/adapter for LoRA, run_dir/model in full) and a critic's head beside it."""
        artifact = self.policy.save(run_dir / ("adapter" if self.policy.is_lora else "model"), self.tokenizer)
        if self.critic is not None:
            from safetensors.torch import save_file

            save_file(self.critic.state_dict(), str(run_dir / "value_head.safetensors"))
        return artifact

    def save_checkpoint(self, directory: Path, state: dict) -> None:
        """Everything `load_checkpoint` continues from, into `directory` (every worker calls it): each worker's random
        generators and place in its prompts' shuffle (`rng-rank<r>.pt`) and its share of the DeepSpeed engine's state;
        from rank 0 `state` (iteration, rows, restarts) and the KL coefficient as JSON and the tensors in `trainer.pt`,
        all under a SHA-256 manifest (as fine-tuning's)."""
        torch.save({**_rng_state(), "prompt_rng": self._rng.getstate(), "prompt_order": self._order},
                   directory / RNG_STATE.format(rank=self.rank))
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory / DEEPSPEED_STATE), tag="state", exclude_frozen_parameters=True)
        barrier()  # every worker's files are in place before rank 0's manifest lists them
        if self.rank != 0:
            return
        weights = {n: p.detach().cpu() for n, p in self.policy.model.named_parameters() if p.requires_grad}
        torch.save({"weights": weights, "critic": self.critic.state_dict() if self.critic is not None else None,
                    "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None},
                   directory / TENSORS)
        fits = {"method": self.recipe.method, "train_method": self.recipe.train.method}  # what resume_source checks
        (directory / TRAINER_STATE).write_text(json.dumps({**state, **fits, "kl_coef": self.kl.value}))
        write_manifest(directory, rank=0)

    def load_checkpoint(self, directory: Path) -> dict:
        """Back to the moment `save_checkpoint` wrote `directory` (its files checked against their manifest first), the
        restored weights synced to the sampler before any rollout; returns the state saved with it."""
        verify_manifest(directory)
        saved = torch.load(directory / TENSORS, map_location="cpu", weights_only=True)
        trained = {n for n, p in self.policy.model.named_parameters() if p.requires_grad}
        if trained != saved["weights"].keys():
            raise RecipeError(f"field 'run.resume_from': {directory} holds other trained tensors than this recipe's "
                              f"policy ({len(saved['weights'])}, not {len(trained)}: another lora.target_modules?)")
        self.policy.model.load_state_dict(saved["weights"], strict=False)
        if self.engine is not None:  # its optimizer and schedule
            path, _ = self.engine.load_checkpoint(str(directory / DEEPSPEED_STATE), tag="state",
                                                  load_module_strict=False)
            if path is None:
                raise RecipeError(f"field 'run.resume_from': {directory} holds no DeepSpeed state (a run without "
                                  "deepspeed.enabled?)")
        self.sampler.sync(self.policy)
        if self.critic is not None:
            self.critic.load_state_dict(saved["critic"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        mine = _set_rng_state(directory / RNG_STATE.format(rank=self.rank))
        if mine is not None:  # where this worker was in its shard's shuffle
            self._rng.setstate(mine["prompt_rng"])
            self._order = list(mine["prompt_order"])
        state = json.loads((directory / TRAINER_STATE).read_text())
        self.kl.value = state["kl_coef"]
        return state


def _rng_state() -> dict:
    """This process's random generators: torch's CPU one, every CUDA device's (when there are any), Python's."""
    return {"cpu": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(path: Path) -> dict | None:
    """Back to the generators `_rng_state` saved in `path` (this worker's own file), which is returned; a worker without
    one (a run resumed on more workers than saved it) keeps the generators seeded at its start, and CUDA's are restored
    only where as many devices are seen as saved them."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    return state


def train(trainer: RLTrainer, on_row: Callable[[dict], None] = lambda row: None, rows: list[dict] | None = None,
          checkpoint: Callable[[list[dict]], object] | None = None) -> list[dict]:
    """Every iteration's metrics row; held-out rewards (`eval_reward`) before the first, every eval_every, after
    the last (the row of iteration 0 holds only the first evaluation), each row handed to `on_row` when done.
    `rows`: a resumed run's so far, continued from the next iteration; `checkpoint(rows)` every
    train.checkpoint_every iterations and after the last."""
    recipe = trainer.recipe
    if not rows:
        rows = [{"iteration": 0, "eval_reward": trainer.evaluate()}]
        on_row(rows[0])
    for number in range(rows[-1]["iteration"] + 1, recipe.rl.iterations + 1):
        started = time.perf_counter()
        row = {"iteration": number, **trainer.iteration()}
        if number % recipe.train.eval_every == 0 or number == recipe.rl.iterations:
            row["eval_reward"] = trainer.evaluate()
        rows.append({**row, "iteration_s": time.perf_counter() - started})
        on_row(rows[-1])
        if checkpoint is not None and (number % recipe.train.checkpoint_every == 0 or number == recipe.rl.iterations):
            checkpoint(rows)
    return rows


def progress_line(recipe: AlignRecipe, row: dict) -> str | None:
    """The line a person sees for an iteration's row: every train.log_every iterations and the last; None otherwise."""
    number = row["iteration"]
    if number == 0 or (number % recipe.train.log_every and number != recipe.rl.iterations):
        return None
    return (f"[llmc] {recipe.method} {number}/{recipe.rl.iterations}: reward {row['mean_reward']:.3f}, "
            f"kl {row['kl']:.4f}, entropy {row['entropy']:.3f}, {row['iteration_s']:.1f} s"
            + (f", held-out {row['eval_reward']:.3f}" if row.get("eval_reward") is not None else ""))
