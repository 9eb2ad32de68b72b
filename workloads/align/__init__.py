"""Alignment from preference pairs, TRL inside Ray Train workers: reward models and DPO (`llmc align`).

`load_reward_model(path).score(texts)` turns a trained reward model into the scoring function PPO and GRPO
(planned, not built yet) will use as their reward. Imported lazily: the CLI registers the recipe without torch.
"""

from __future__ import annotations

__all__ = ["RewardModel", "load_reward_model", "pairwise_accuracy"]


def __getattr__(name: str):
    if name in __all__:
        from workloads.align import reward

        return getattr(reward, name)
    raise AttributeError(f"module 'workloads.align' has no attribute {name!r}")
