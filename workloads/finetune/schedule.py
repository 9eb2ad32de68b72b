"""How long a fine-tuning run is: `train.max_steps`, or `train.num_epochs` resolved against the data.

One epoch is every worker's share of the training examples, in optimizer steps of `micro_batch_size` x
`gradient_accumulation_steps` examples per worker (the remainder of a share that fills no step is skipped,
as `finetune.StepBatches` does). The driver and every worker resolve the count with these functions.
"""

from __future__ import annotations

import math

from workloads.finetune.recipe import TrainConfig


def steps_per_epoch(num_examples: int, micro_batch_size: int, accumulation: int, world_size: int) -> int:
    """Optimizer steps in one pass over `num_examples` split across `world_size` workers."""
    return (num_examples // world_size) // (micro_batch_size * accumulation)


def total_steps(train: TrainConfig, per_epoch: int) -> int:
    """The run's optimizer steps: max_steps, else num_epochs x steps per epoch, rounded up."""
    if train.max_steps is not None:
        return train.max_steps
    if per_epoch < 1:
        raise ValueError("an epoch of this data fills no optimizer step: num_epochs cannot be resolved")
    return max(1, math.ceil(train.num_epochs * per_epoch - 1e-9))  # 0.24 x 125 is 30.000000000000004


def describe(train: TrainConfig, per_epoch: int, world_size: int) -> str:
    """One line for the terminal: the resolved length and the batch it is made of."""
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * world_size
    length = (f"{train.num_epochs:g} epoch(s) x {per_epoch} steps" if train.num_epochs is not None
              else f"max_steps, {per_epoch} steps per epoch")
    return f"schedule: {total_steps(train, per_epoch)} optimizer steps ({length}; global batch {global_batch})"
