"""The policy the RL methods (PPO, GRPO, RLOO) train, the reference it is held to, and PPO's critic head.

The reference is the starting policy. A fresh LoRA policy's is the base with the adapter disabled (PEFT's
`disable_adapter()`, as verl does); a policy continuing an adapter (`rl.adapter`, e.g. SFT's) keeps a frozen copy
of it beside the trained one, as TRL's DPO does, because the base without the adapter is not where it started;
a fully trained policy keeps a frozen copy of the whole model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch

from workloads.align.recipe import AlignRecipe
from workloads.common.paths import resolve_path
from workloads.models.loading import load_model
from workloads.models.lora import attach_lora

REFERENCE_ADAPTER = "reference"


class Policy:
    """A causal LM being trained, with `reference()`: a context in which the same object computes as the reference."""

    def __init__(self, model, frozen_copy=None):
        self.model, self._frozen_copy = model, frozen_copy
        self._reference_adapter = REFERENCE_ADAPTER in getattr(model, "peft_config", {})

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    @contextlib.contextmanager
    def reference(self) -> Iterator[object]:
        """Yields the model to run as the reference (under no_grad); the policy is itself again afterwards."""
        with torch.no_grad():
            if self._frozen_copy is not None:
                yield self._frozen_copy
            elif self._reference_adapter:
                self.model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
                try:
                    yield self.model
                finally:
                    self.model.set_adapter("default")  # trainable again
            else:
                with self.model.disable_adapter():
                    yield self.model

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, out_dir: Path, tokenizer=None) -> Path:
        """The trained adapter (only it, not the reference copy), or the whole model (with `tokenizer`, if given)."""
        if self.is_lora:
            self.model.save_pretrained(str(out_dir), selected_adapters=["default"])
        else:
            self.model.save_pretrained(str(out_dir))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(out_dir))
        return out_dir


def load_policy(recipe: AlignRecipe, model_path: str) -> Policy:
    """The starting policy the recipe names: `rl.adapter` continued, a fresh LoRA, or the full model."""
    model = load_model(model_path, dtype=recipe.model.dtype, revision=recipe.model.revision,
                       attn_implementation=recipe.model.attn_implementation)
    if recipe.train.method == "full":
        return Policy(model, frozen_copy=copy.deepcopy(model).eval().requires_grad_(False))
    if recipe.rl.adapter is None:
        return Policy(attach_lora(model, recipe.lora))
    from peft import PeftModel

    adapter = str(resolve_path(recipe.rl.adapter) or recipe.rl.adapter)  # the schema found it, maybe in the repo
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.load_adapter(adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    return Policy(model)


class ValueHead(torch.nn.Module):
    """PPO's critic: a small MLP from the policy's last hidden state before each token to that state's value.

    It reads the hidden states detached, so the value loss trains only this head and the policy's update is the
    same as under GRPO (a separate critic model, as OpenRLHF keeps, is for later).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden_size, hidden_size), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden_size, 1))
        torch.nn.init.zeros_(self.net[-1].weight)  # values start at 0: the first advantages are the rewards
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.detach().float()).squeeze(-1)
