"""PPO and GRPO (`llmc align` with `method: ppo | grpo`): one RL loop, two advantage estimators, in one process.

Each iteration: sample `rl.group_size` completions for each of `rl.prompts_per_iteration` training prompts, score
them with the recipe's rewards, take the policy's and the reference's log-probs of every completion token (and,
for PPO, the critic's values), turn scores into advantages (GRPO: normalized within each prompt's group; PPO: GAE
over per-token rewards, whitened), then `rl.epochs` passes of clipped policy updates in minibatches, then the new
weights go to the sampler. The KL to the reference is charged in the reward or the loss, with a fixed or adaptive
coefficient. Held-out prompts are answered greedily and scored before the first iteration, every `train.eval_every`
and after the last.

Rollouts (and the held-out answers) come from `rl.rollout`: `generate`, the policy's own `model.generate`, or `vllm`,
an in-process vLLM engine (workloads.align.vllm_rollout) given the policy's weights after every update and after a
checkpoint is restored, the seconds of that sync in each iteration's `weight_sync_s`. The old log-probs the update is
clipped against are always recomputed by the policy's own forward, so the engine's numerics never enter the loss.

Every `train.checkpoint_every` iterations (and after the last) a checkpoint goes to `<run dir>/checkpoints/<run.name>/
checkpoint_<iteration>` (written beside it, then renamed into place; the newest `train.keep_checkpoints` kept): the
trained weights, the critic, optimizer, schedule, KL coefficient, prompt order, RNG states and the metrics rows so far.
`run.resume_from: latest | DIR` continues from the next iteration as if never stopped.

Plain PyTorch, no Ray: one process (the engine in a child process of its own); Ray placement (Train workers, engines
as actors) is issue 12's part still to come, and will drive this same `RLTrainer`.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workloads import reporting
from workloads.align.estimators import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    grpo_advantages,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_kl,
    value_loss,
)
from workloads.align.policy import Policy, ValueHead, load_policy
from workloads.align.prompts import Prompt, split_prompts
from workloads.align.recipe import SCHEDULERS, AlignRecipe
from workloads.align.rewards import build_reward
from workloads.align.rollout import GenerateSampler, Rollout, token_outputs
from workloads.config import RESUME_LATEST, RecipeError
from workloads.models import load_tokenizer, merge_adapter
from workloads.strategy import verify_manifest, write_manifest

PHASES = ("generation_s", "scoring_s", "logprobs_s", "training_s", "weight_sync_s")  # seconds of each, per iteration
CHECKPOINT = "checkpoint_"  # + the iteration: one checkpoint directory
TRAINER_STATE = "trainer_state.json"  # in a checkpoint: iteration, metrics rows, KL coefficient, restarts
TENSORS = "trainer.pt"  # in a checkpoint: trained weights, critic, optimizer, schedule, RNG states, prompt order
ROLLOUTS = {"generate": "model.generate", "vllm": "vLLM engine"}  # what samples, by rl.rollout


@dataclass
class Experience:
    """One iteration's rollout with everything the update needs, per completion (rows) or per token."""

    rollout: Rollout
    scores: torch.Tensor  # (rows,): the summed reward
    old_logprobs: torch.Tensor  # (rows, tokens): the policy's at sampling time
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # PPO: the critic's, before each token
    advantages: torch.Tensor  # (rows,) for GRPO, (rows, tokens) for PPO
    returns: torch.Tensor | None  # PPO: the critic's targets

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask


class RLTrainer:
    """setup (in __init__, in order), then `iteration()` as often as the recipe says, `evaluate()`, `save()`."""

    def __init__(self, recipe: AlignRecipe, model_path: str, train: list[Prompt], held_out: list[Prompt],
                 work_dir: Path | None = None):
        self.recipe, self.rl, self.ppo = recipe, recipe.rl, recipe.method == "ppo"
        torch.manual_seed(recipe.train.seed)  # sampling uses torch's global generator
        self.tokenizer = load_tokenizer(model_path, recipe.model.revision, recipe.model.chat_template)
        self.train_prompts = self._fitting(train)
        self.held_out = self._fitting(held_out)[: self.rl.eval_prompts]
        if not self.train_prompts:
            raise RecipeError(f"field 'data.max_length': no training prompt is under {recipe.data.max_length} - "
                              f"rl.max_new_tokens ({self.rl.max_new_tokens}) tokens")
        self.reward = build_reward(recipe.rewards, dtype=recipe.model.dtype)
        self.policy: Policy = load_policy(recipe, model_path)
        self.critic = ValueHead(self.policy.model.config.hidden_size) if self.ppo else None
        self.optimizer, self.scheduler = self._setup_optimizer()
        self.kl = (AdaptiveKLController(self.rl.kl.coef, self.rl.kl.target, self.rl.kl.horizon)
                   if self.rl.kl.target is not None else FixedKLController(self.rl.kl.coef))
        self.sampler = self._setup_sampler(model_path, work_dir)
        self._order: list[int] = []
        self._rng = random.Random(recipe.train.seed)

    def _fitting(self, prompts: list[Prompt]) -> list[tuple[Prompt, list[int]]]:
        """Each prompt with its chat-rendered token ids; prompts that leave no room for a completion are left out."""
        room = self.recipe.data.max_length - self.rl.max_new_tokens
        texts = [self.tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [(p, i) for p, i in zip(prompts, ids, strict=True) if len(i) <= room]

    def _setup_sampler(self, model_path: str, work_dir: Path | None):
        """`rl.rollout`'s sampler: the policy's own generate, or a vLLM engine holding the policy's weights (synced
        through `<work_dir>/rollout_weights`, a temporary directory without one)."""
        if self.rl.rollout == "generate":
            return GenerateSampler(self.tokenizer, self.rl.max_new_tokens, self.rl.temperature)
        from workloads.align.vllm_rollout import VLLMSampler

        directory = work_dir / "rollout_weights" if work_dir else Path(tempfile.mkdtemp(prefix="llmc-rollout-"))
        return VLLMSampler(self.recipe, model_path, self.tokenizer, self.policy, directory)

    def _setup_optimizer(self):
        """AdamW over the policy's trainable weights (and the critic's, at its own rate); the recipe's schedule over
        every optimizer step of the run."""
        from transformers import get_scheduler

        t = self.recipe.train
        groups = [{"params": self.policy.parameters(), "lr": t.learning_rate}]
        if self.critic is not None:
            groups.append({"params": list(self.critic.parameters()), "lr": self.rl.critic_learning_rate})
        optimizer = torch.optim.AdamW(groups, betas=t.adam_betas, eps=t.adam_eps, weight_decay=t.weight_decay)
        rows = self.rl.prompts_per_iteration * self.rl.group_size
        steps = self.rl.iterations * self.rl.epochs * -(-rows // self.minibatch_size)
        return optimizer, get_scheduler(SCHEDULERS[t.lr_scheduler], optimizer, t.warmup_steps, steps)

    @property
    def minibatch_size(self) -> int:
        return self.recipe.train.micro_batch_size * self.recipe.train.gradient_accumulation_steps

    # -- one iteration: rollout, scoring, log-probs, advantages, update -------------------------------------------

    def iteration(self) -> dict:
        """One rollout batch and its updates; returns the iteration's metrics row (without its number)."""
        prompts = self._next_prompts()
        clock = time.perf_counter()
        rollout = self.sampler.sample(self.policy.model, [ids for _, ids in prompts], self.rl.group_size)
        generated = time.perf_counter()
        group = [p for p, _ in prompts for _ in range(self.rl.group_size)]
        scores, terms = self.reward.score([p.messages for p in group], rollout.completions,
                                          [p.reference for p in group])
        scored = time.perf_counter()
        experience, stats = self._make_experience(rollout, torch.tensor(scores))
        measured = time.perf_counter()
        stats |= self._update(experience)
        self.kl.update(stats["kl"], len(scores))
        trained = time.perf_counter()
        self.sampler.sync(self.policy)  # the next rollout (and evaluation) samples from the updated policy
        return {"mean_reward": sum(scores) / len(scores),
                **{f"reward_{name}": sum(v) / len(v) for name, v in terms.items()}, **stats,
                "response_tokens": rollout.response_mask.sum(1).float().mean().item(),
                "generation_s": generated - clock, "scoring_s": scored - generated, "logprobs_s": measured - scored,
                "training_s": trained - measured, "weight_sync_s": time.perf_counter() - trained}

    def _next_prompts(self) -> list[tuple[Prompt, list[int]]]:
        """The next `prompts_per_iteration` training prompts of a seeded shuffle, reshuffled once used up."""
        while len(self._order) < self.rl.prompts_per_iteration:
            self._order += self._rng.sample(range(len(self.train_prompts)), len(self.train_prompts))
        taken, self._order = self._order[: self.rl.prompts_per_iteration], self._order[self.rl.prompts_per_iteration:]
        return [self.train_prompts[i] for i in taken]

    @torch.no_grad()
    def _make_experience(self, rollout: Rollout, scores: torch.Tensor) -> tuple[Experience, dict]:
        """Log-probs (policy, reference), values, the KL estimate and the advantages of a scored rollout."""
        temperature, mask = self.rl.temperature, rollout.response_mask
        chunks = [torch.arange(i, min(i + self.recipe.train.micro_batch_size, len(scores)))
                  for i in range(0, len(scores), self.recipe.train.micro_batch_size)]
        policy = [token_outputs(self.policy.model, rollout.select(c), temperature, entropy=True, hidden=self.ppo)
                  for c in chunks]
        with self.policy.reference() as reference:
            ref = torch.cat([token_outputs(reference, rollout.select(c), temperature).logprobs for c in chunks])
        old = torch.cat([o.logprobs for o in policy])
        values = torch.cat([self.critic(o.hidden) for o in policy]) * mask if self.critic is not None else None
        kl = token_kl(old, ref, self.rl.kl.estimator) * mask
        penalty = self.kl.value * kl if self.rl.kl.penalty == "reward" else torch.zeros_like(kl)
        returns = None
        if self.ppo:
            rewards = -penalty
            last = mask.sum(1) - 1  # the score lands on each completion's last token
            rewards[torch.arange(len(scores)), last] += scores
            advantages, returns = gae(rewards, values, mask, self.rl.gamma, self.rl.lam)
            advantages = masked_whiten(advantages, mask)
        else:
            advantages = grpo_advantages(scores - penalty.sum(1), self.rl.group_size, self.rl.scale_rewards)
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
                    (loss * exp.mask[micro].sum() / tokens).backward()  # each token weighs the same in a minibatch
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value * len(micro) / len(minibatch)
                self._step()
                steps += 1
        self.policy.model.eval()
        return {key: value / steps for key, value in totals.items()}

    def _loss(self, exp: Experience, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The clipped policy loss of some rows, with the entropy bonus, a KL term (penalty: loss) and, for PPO,
        the critic's clipped value loss."""
        rl, mask = self.rl, exp.mask[rows]
        out = token_outputs(self.policy.model, exp.rollout.select(rows), rl.temperature,
                            entropy=rl.entropy_coef > 0, hidden=self.ppo)
        loss, clipped = policy_loss(out.logprobs, exp.old_logprobs[rows], exp.advantages[rows], mask, rl.clip_range)
        stats = {"policy_loss": loss.item(), "clip_fraction": clipped.item()}
        if rl.entropy_coef > 0:
            loss = loss - rl.entropy_coef * masked_mean(out.entropy, mask)
        if rl.kl.penalty == "loss":
            loss = loss + self.kl.value * masked_mean(token_kl(out.logprobs, exp.ref_logprobs[rows],
                                                               rl.kl.estimator), mask)
        if self.critic is not None:
            critic_loss = value_loss(self.critic(out.hidden), exp.values[rows], exp.returns[rows], mask,
                                     rl.value_clip_range)
            stats["value_loss"] = critic_loss.item()
            loss = loss + critic_loss  # the critic reads detached hidden states: this trains only its head
        return loss, stats

    def _step(self) -> None:
        """Clip the policy's and the critic's gradients separately (the critic's are larger early on), step."""
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.recipe.train.max_grad_norm)
        if self.critic is not None:
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.recipe.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- evaluation, saving, checkpoints ------------------------------------------------------------------------

    def evaluate(self) -> float | None:
        """Mean reward of the greedy answers to the held-out prompts; None when there are none."""
        if not self.held_out:
            return None
        answers = self.sampler.sample(self.policy.model, [ids for _, ids in self.held_out], 1, greedy=True)
        scores, _ = self.reward.score([p.messages for p, _ in self.held_out], answers.completions,
                                      [p.reference for p, _ in self.held_out])
        return sum(scores) / len(scores)

    def save(self, run_dir: Path) -> Path:
        """The policy (run_dir/adapter for LoRA, run_dir/model in full) and PPO's critic head beside it."""
        artifact = self.policy.save(run_dir / ("adapter" if self.policy.is_lora else "model"), self.tokenizer)
        if self.critic is not None:
            from safetensors.torch import save_file

            save_file(self.critic.state_dict(), str(run_dir / "value_head.safetensors"))
        return artifact

    def save_checkpoint(self, directory: Path, state: dict) -> None:
        """Everything `load_checkpoint` continues from, into `directory`: `state` (iteration, rows, restarts) and the
        KL coefficient as JSON, tensors and RNG states in `trainer.pt`, under a SHA-256 manifest (as fine-tuning's)."""
        weights = {n: p.detach().cpu() for n, p in self.policy.model.named_parameters() if p.requires_grad}
        torch.save({"weights": weights, "critic": self.critic.state_dict() if self.critic is not None else None,
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "prompt_rng": self._rng.getstate(),
                    "prompt_order": self._order}, directory / TENSORS)
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
        self.sampler.sync(self.policy)
        if self.critic is not None:
            self.critic.load_state_dict(saved["critic"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        self._rng.setstate(saved["prompt_rng"])
        self._order = list(saved["prompt_order"])
        state = json.loads((directory / TRAINER_STATE).read_text())
        self.kl.value = state["kl_coef"]
        return state


def train(trainer: RLTrainer, log=print, rows: list[dict] | None = None,
          checkpoint: Callable[[list[dict]], object] | None = None) -> list[dict]:
    """Every iteration's metrics row; held-out rewards (`eval_reward`) before the first, every eval_every, after
    the last (the row of iteration 0 holds only the first evaluation). `rows`: a resumed run's so far, continued
    from the next iteration; `checkpoint(rows)` every train.checkpoint_every iterations and after the last."""
    recipe = trainer.recipe
    rows = rows or [{"iteration": 0, "eval_reward": trainer.evaluate()}]
    for number in range(rows[-1]["iteration"] + 1, recipe.rl.iterations + 1):
        started = time.perf_counter()
        row = {"iteration": number, **trainer.iteration()}
        if number % recipe.train.eval_every == 0 or number == recipe.rl.iterations:
            row["eval_reward"] = trainer.evaluate()
        rows.append({**row, "iteration_s": time.perf_counter() - started})
        if number % recipe.train.log_every == 0 or number == recipe.rl.iterations:
            log(f"[llmc] {recipe.method} {number}/{recipe.rl.iterations}: reward {row['mean_reward']:.3f}, "
                f"kl {row['kl']:.4f}, entropy {row['entropy']:.3f}, {rows[-1]['iteration_s']:.1f} s"
                + (f", held-out {row['eval_reward']:.3f}" if row.get("eval_reward") is not None else ""))
        if checkpoint is not None and (number % recipe.train.checkpoint_every == 0 or number == recipe.rl.iterations):
            checkpoint(rows)
    return rows


def run(recipe: AlignRecipe, run_dir: Path) -> dict:
    """`llmc align` for ppo and grpo: prompts and rewards checked, then the loop, then the run's outputs."""
    from workloads.models import resolve_model_path

    train_prompts, held_out = split_prompts(recipe.data, recipe.train.seed)  # bad rows fail here, naming them
    checkpoints = checkpoint_dir(recipe, run_dir)
    source = resume_source(recipe, checkpoints)  # a checkpoint that is missing or does not fit fails here
    model_path = resolve_model_path(recipe.model)
    torch.set_num_threads(recipe.scaling.cpus_per_worker)  # the loop runs as one worker for now
    run_dir.mkdir(parents=True, exist_ok=True)
    reporting.save_recipe(recipe, run_dir)
    started = time.perf_counter()
    trainer = RLTrainer(recipe, model_path, train_prompts, held_out, work_dir=run_dir)
    print(f"[llmc] {recipe.method} on {recipe.model.name} ({model_path}): {len(trainer.train_prompts)} training "
          f"prompts, {len(trainer.held_out)} held out, rollouts: {ROLLOUTS[recipe.rl.rollout]}; one process "
          "(no Ray yet)", flush=True)
    rows, restarts = None, []
    with contextlib.closing(trainer.sampler):  # a vLLM engine stops when the loop is done, or fails
        if source is not None:
            state = trainer.load_checkpoint(source)
            rows, restarts = state["rows"], [*state["restarts"], {"from_iteration": state["iteration"],
                                                                  "via": "resume_from"}]
            print(f"[llmc] resumed from {source}: iteration {state['iteration']}", flush=True)
        if recipe.run.resume_from != RESUME_LATEST:  # a new run: an earlier one's checkpoints are not its own
            clear_checkpoints(checkpoints, spare=source)

        def checkpoint(rows: list[dict]) -> Path:
            state = {"iteration": rows[-1]["iteration"], "rows": rows, "restarts": restarts}
            return write_checkpoint(trainer, state, checkpoints, recipe.train.keep_checkpoints)

        rows = train(trainer, log=lambda line: print(line, flush=True), rows=rows, checkpoint=checkpoint)
    artifact = trainer.save(run_dir)
    merged = None
    if recipe.run.merge_adapter:
        merged = str(merge_adapter(model_path, artifact, run_dir / "merged", dtype=recipe.model.dtype))
    summary = summarize(recipe, rows, len(trainer.train_prompts), len(trainer.held_out))
    summary |= {"model": recipe.model.name, "base_model_path": model_path, "train_method": recipe.train.method,
                "start_adapter": recipe.rl.adapter, "wall_seconds": time.perf_counter() - started,
                "artifact": str(artifact), "merged": merged, "restarts": restarts,
                "checkpoint": str((list_checkpoints(checkpoints) or [source])[-1])}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    reporting.write_csv(rows, run_dir / "metrics.csv")
    plot_curves(rows, run_dir / "curves.png", recipe.method)
    reporting.print_summary(f"{recipe.method} summary", summary, run_dir)
    return summary


def checkpoint_dir(recipe: AlignRecipe, run_dir: Path) -> Path:
    """Where the run's checkpoints go, as fine-tuning's: `run.storage_path` (else `<run dir>/checkpoints`)/run.name."""
    return Path(recipe.run.storage_path or run_dir / "checkpoints").resolve() / recipe.run.name


def list_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in `directory`, oldest first (one being written is a hidden temporary directory)."""
    found = directory.glob(f"{CHECKPOINT}*") if directory.is_dir() else []
    return sorted((p for p in found if (p / TRAINER_STATE).is_file()), key=lambda p: int(p.name[len(CHECKPOINT):]))


def resume_source(recipe: AlignRecipe, directory: Path) -> Path | None:
    """The checkpoint `run.resume_from` names (`latest`: the newest in `directory`), checked to fit the recipe;
    None when the run starts fresh."""
    wanted = recipe.run.resume_from
    if wanted is None:
        return None
    if wanted == RESUME_LATEST:
        found = list_checkpoints(directory)
        if not found:
            raise RecipeError(f"field 'run.resume_from': no checkpoint of run {recipe.run.name!r} to resume in "
                              f"{directory}")
        source = found[-1]
    else:
        source = Path(wanted).expanduser().resolve()
        if not (source / TRAINER_STATE).is_file():
            raise RecipeError(f"field 'run.resume_from': {wanted} is not a ppo or grpo checkpoint (no {TRAINER_STATE})")
    state = json.loads((source / TRAINER_STATE).read_text())
    if (state["method"], state["train_method"]) != (recipe.method, recipe.train.method):
        raise RecipeError(f"field 'run.resume_from': {source} is a checkpoint of {state['method']} "
                          f"({state['train_method']}); this recipe runs {recipe.method} ({recipe.train.method})")
    if state["iteration"] > recipe.rl.iterations:
        raise RecipeError(f"field 'rl.iterations': {source} is at iteration {state['iteration']}, past "
                          f"rl.iterations ({recipe.rl.iterations})")
    return source


def write_checkpoint(trainer: RLTrainer, state: dict, directory: Path, keep: int) -> Path:
    """A checkpoint of iteration `state["iteration"]`, written into a temporary directory beside it and renamed into
    place, so a run killed meanwhile leaves none half-written; then only the newest `keep` stay."""
    final = directory / f"{CHECKPOINT}{state['iteration']:06d}"
    directory.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=directory))
    trainer.save_checkpoint(partial, state)
    shutil.rmtree(final, ignore_errors=True)  # a replaced run's, of the same iteration
    partial.rename(final)
    for stale in [*directory.glob(f".{CHECKPOINT}*"), *list_checkpoints(directory)[:-keep]]:
        shutil.rmtree(stale)  # older checkpoints, and what a killed run left half-written
    return final


def clear_checkpoints(directory: Path, spare: Path | None = None) -> None:
    """A new run's start: an earlier run's checkpoints go (but `spare`, the one it resumes from, if among them)."""
    for path in directory.glob(f"*{CHECKPOINT}*") if directory.is_dir() else []:
        if spare is None or path.resolve() != spare.resolve():
            shutil.rmtree(path)


def summarize(recipe: AlignRecipe, rows: list[dict], train_prompts: int, held_out: int) -> dict:
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
            * recipe.rl.group_size, "train_prompts": train_prompts, "held_out_prompts": held_out,
            "rewards": [t.model_dump(exclude_defaults=True) for t in recipe.rewards],
            "rollouts": ROLLOUTS[recipe.rl.rollout],
            **{f"total_{phase}": sum(r[phase] for r in iterations) for phase in PHASES}}


def plot_curves(rows: list[dict], path: Path, method: str) -> Path:
    """Two panels: mean reward per iteration (rollouts, and held-out greedy answers), and KL to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations, evals = rows[1:], [r for r in rows if r.get("eval_reward") is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["iteration"] for r in iterations], [r["mean_reward"] for r in iterations], label="rollouts")
    left.plot([r["iteration"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="held-out (greedy)")
    left.set(xlabel="iteration", ylabel="mean reward")
    right.plot([r["iteration"] for r in iterations], [r["kl"] for r in iterations], color="tab:red")
    right.set(xlabel="iteration", ylabel="KL to the reference (per completion)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend()
    fig.suptitle(f"{method}: reward and KL")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
