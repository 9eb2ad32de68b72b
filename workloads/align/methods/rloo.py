"""RLOO (`method: rloo`, Ahmadian et al. 2024, "Back to Basics"): no critic; each completion's reward (minus its
summed KL penalty) minus the mean reward of the other completions of its prompt's group, a baseline that does not
depend on the completion itself, so the policy gradient stays unbiased. One advantage per completion, not rescaled."""

from __future__ import annotations

import torch

from workloads.align.estimators import rloo_advantages
from workloads.align.methods.base import RLMethod


class RLOO(RLMethod):
    name = "rloo"

    def advantages(self, scores: torch.Tensor, penalty: torch.Tensor, mask: torch.Tensor,
                   values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Leave-one-out advantages, one per completion; no returns."""
        return rloo_advantages(scores - penalty.sum(1), self.rl.group_size), None
