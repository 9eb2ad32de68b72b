"""The arithmetic of the RL methods (PPO, GRPO, RLOO) on per-token tensors: KL estimates, advantages, losses, KL
control. The methods themselves (workloads.align.methods) pick which of these they use.

Every per-token tensor is (sequences, response tokens), with a 0/1 `mask` marking real response tokens (the stop
token included, right padding excluded). GRPO needs only `grpo_advantages` and RLOO `rloo_advantages`; PPO adds
`gae`, a critic and `value_loss`; all share `policy_loss`, `token_kl`, `entropy` and the KL controllers. Pure
functions of tensors (no model, no Ray), each checked against hand-computed values in tests/test_rl_estimators.py.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the masked-in entries (of `dim`, or of all); 0 where none is."""
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked-in entries (PPO's advantage normalization); 0 outside the mask."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs (Schulman's estimators).

    k1: log p - log q, unbiased but negative on some tokens (the one Ziegler et al. and OpenRLHF put in the reward);
    k3: (q/p) - 1 - log(q/p), unbiased and never negative (the GRPO paper's loss term).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution, in nats: (sequences, tokens)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each completion's reward minus its group's mean (the k completions of one prompt, consecutive), divided
    by the group's standard deviation when `scale` (Dr. GRPO leaves it out). One advantage per completion."""
    groups = rewards.float().view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (groups.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each completion's reward minus the mean reward of the other completions of its group (the k completions
    of one prompt, consecutive; k at least 2). One advantage per completion."""
    groups = rewards.float().view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each response: (advantages, returns), both 0 outside the mask.

    `rewards` per token (the score on the last real token, minus any KL penalty on every token); `values` the
    critic's estimate before each token. Past the last real token values and rewards count as 0, so a padded
    position adds nothing and the last real token bootstraps from 0.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, averaged over the masked tokens: (loss, share of tokens whose ratio was clipped).

    `advantages` per token (sequences, tokens), or one per sequence (sequences,), as GRPO gives them.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> torch.Tensor:
    """PPO's clipped value loss: 0.5 x the larger of the squared errors of the new values and of the new values kept
    within `clip_range` of the rollout's, averaged over the masked tokens."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, kl: float, n_samples: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Ziegler et al. (2019)'s controller, as OpenRLHF's AdaptiveKLController: moves the coefficient so the measured
    KL (per sequence) approaches `target`, by at most 20% of the error per `horizon` samples."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        """After an iteration whose sequences had mean KL `kl`: scale the coefficient toward the target."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
