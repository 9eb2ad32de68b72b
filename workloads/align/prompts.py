"""Prompts for the RL methods: chat rows read as (prompt messages, reference answer), checked row by row.

A row in a chat format (alpaca, messages, sharegpt; workloads.data.formats) is a prompt: every message before its
last assistant turn, and that turn's text as the reference answer the reward functions compare against. The driver
reads them before any model work, so a bad row fails in seconds naming field, row and key.
"""

from __future__ import annotations

from dataclasses import dataclass

from workloads.align.preference import hold_out
from workloads.align.recipe import AlignDataConfig
from workloads.common.recipe import RecipeError
from workloads.data.formats import to_messages
from workloads.data.sources import read_path


@dataclass(frozen=True)
class Prompt:
    """What the policy answers (chat messages ending before the assistant's turn) and the reference answer."""

    messages: list[dict]
    reference: str


def read_prompts(path: str, field: str, fmt: str, system_prompt: str | None = None) -> list[Prompt]:
    """Every row of one file as a Prompt; RecipeError names the field, row and what is missing."""
    rows = read_path(path, field=field)
    if not rows:
        raise RecipeError(f"field '{field}': {path} holds no rows")
    prompts = []
    for number, row in enumerate(rows, 1):
        try:
            messages = to_messages(row, fmt, system_prompt)
        except (KeyError, TypeError) as exc:
            raise RecipeError(f"field '{field}': {path} row {number}: not a {fmt} row ({exc} missing or "
                              "malformed)") from None
        if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] == "assistant":
            raise RecipeError(f"field '{field}': {path} row {number}: needs a prompt turn, then an assistant turn "
                              "(the reference answer) last")
        prompts.append(Prompt(messages[:-1], messages[-1]["content"]))
    return prompts


def split_prompts(cfg: AlignDataConfig, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Training and held-out prompts, split as preference pairs are (`eval_path`, else `eval_fraction`)."""
    return hold_out(cfg, seed, lambda path, field: read_prompts(path, field, cfg.format, cfg.system_prompt),
                    "prompts")
