"""RL methods, one module each (`ppo.py`, `grpo.py`, `rloo.py`, implementing `base.RLMethod`), looked up by the align
recipe's `method` in one table. Adding a method: its module, its line here, a test of its advantages (and, when it
compares a prompt's completions, its entry in workloads.align.recipe.GROUP_METHODS).

The table names classes as `module:Class` and imports one only when a run builds it, so the recipe schema (which
takes its RL method names from here) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workloads.align.methods.base import RLMethod
    from workloads.align.recipe import AlignRecipe

METHODS = {  # the recipe's `method` -> its class
    "ppo": "workloads.align.methods.ppo:PPO",
    "grpo": "workloads.align.methods.grpo:GRPO",
    "rloo": "workloads.align.methods.rloo:RLOO",
}


def method_class(name: str) -> type[RLMethod]:
    """The class of RL method `name` (a key of METHODS)."""
    module, _, attribute = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def build_method(recipe: AlignRecipe) -> RLMethod:
    """The recipe's RL method, configured by its `rl` block."""
    return method_class(recipe.method)(recipe.rl)
