"""What the RL loop (workloads.align.rl) asks of a method, and nothing else: whether it trains a critic, how a scored
rollout becomes advantages, the policy's loss on a minibatch and, with a critic, the critic's loss.

Rollout, scoring, log-probs, the KL to the reference and its coefficient, minibatching, optimizer steps, checkpoints
and weight sync are the loop's and the same for every method. A method is a subclass in a module of its own that
calls the pure tensor functions of workloads.align.estimators (the arithmetic lives there, tested by hand), and an
entry in workloads.align.methods.METHODS under the recipe's `method` name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from workloads.align.estimators import policy_loss

if TYPE_CHECKING:
    from workloads.align.recipe import RlOptions


class RLMethod(ABC):
    """One RL method, built from the recipe's `rl` block. Every per-token tensor is (completions, response tokens),
    `mask` 1 on real response tokens; a prompt's `rl.group_size` completions are consecutive rows."""

    name: ClassVar[str]  # the recipe's `method`
    needs_critic: ClassVar[bool] = False  # a value head on the policy (workloads.align.policy.ValueHead), trained too

    def __init__(self, rl: RlOptions):
        self.rl = rl

    @abstractmethod
    def advantages(self, scores: torch.Tensor, penalty: torch.Tensor, mask: torch.Tensor,
                   values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages, returns) of a scored rollout. `scores` (completions,): each completion's summed reward;
        `penalty` per token: the KL coefficient x the token's KL when `rl.kl.penalty` is reward, else zeros; `values`:
        the critic's before each token (None without one). Advantages are one per completion (completions,) or one
        per token; returns are the critic's targets (None without one)."""

    def policy_loss(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, share of tokens clipped) of some rows: PPO's clipped surrogate at `rl.clip_range` unless a method
        clips otherwise."""
        return policy_loss(logprobs, old_logprobs, advantages, mask, self.rl.clip_range)

    def critic_loss(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """The critic's loss on some rows (only a method that `needs_critic` is asked)."""
        raise NotImplementedError(f"{self.name} trains no critic")
