"""PPO (`method: ppo`): a critic's values before each token, GAE over per-token rewards (the score on each
completion's last token, minus the KL penalty on every token), advantages whitened over the batch, and the critic
trained by a clipped value loss toward GAE's returns."""

from __future__ import annotations

import torch

from workloads.align.estimators import gae, masked_whiten, value_loss
from workloads.align.methods.base import RLMethod


class PPO(RLMethod):
    name = "ppo"
    needs_critic = True

    def advantages(self, scores: torch.Tensor, penalty: torch.Tensor, mask: torch.Tensor,
                   values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token GAE advantages (whitened) and returns, at `rl.gamma` and `rl.lam`."""
        rewards = -penalty
        last = mask.sum(1) - 1  # the score lands on each completion's last token
        rewards[torch.arange(len(scores)), last] += scores
        advantages, returns = gae(rewards, values, mask, self.rl.gamma, self.rl.lam)
        return masked_whiten(advantages, mask), returns

    def critic_loss(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """The clipped value loss, within `rl.value_clip_range` of the rollout's values."""
        return value_loss(values, old_values, returns, mask, self.rl.value_clip_range)
