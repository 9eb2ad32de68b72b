"""Alignment (`llmc align`): reward models and DPO from preference pairs (TRL inside Ray Train workers), and PPO,
GRPO and RLOO from prompts (workloads.align.rl: one RL loop; each method a module of workloads.align.methods).

`load_reward_model(path).score(texts)` turns a trained reward model into a scoring function, which PPO and GRPO
recipes use as a reward term (workloads.align.rewards). Imported lazily: the CLI registers the recipe without torch.
"""

from __future__ import annotations

__all__ = ["RewardModel", "load_reward_model", "pairwise_accuracy"]


def __getattr__(name: str):
    if name in __all__:
        from workloads.align import reward

        return getattr(reward, name)
    raise AttributeError(f"module 'workloads.align' has no attribute {name!r}")
