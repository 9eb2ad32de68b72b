"""GRPO (`method: grpo`): no critic; each completion's reward (minus its summed KL penalty) compared with the others of
its prompt's group: minus the group's mean, divided by its standard deviation unless `rl.scale_rewards` is false
(Dr. GRPO). One advantage per completion, shared by its tokens."""

from __future__ import annotations

import torch

from workloads.align.estimators import grpo_advantages
from workloads.align.methods.base import RLMethod


class GRPO(RLMethod):
    name = "grpo"

    def advantages(self, scores: torch.Tensor, penalty: torch.Tensor, mask: torch.Tensor,
                   values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Group-normalized advantages, one per completion; no returns."""
        return grpo_advantages(scores - penalty.sum(1), self.rl.group_size, self.rl.scale_rewards), None
