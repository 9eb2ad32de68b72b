"""Preference pairs: read, checked row by row, and split into training and held-out pairs.

Rows are TRL's preference format, standard (`prompt`, `chosen`, `rejected` strings) or conversational (lists of
`{role, content}` messages); `prompt` may be left out when it is inside both answers. The driver reads them before
any Ray work, so a bad file fails in seconds naming field, row and key, and hands the rows it checked to the workers.
"""

from __future__ import annotations

import random

from workloads.align.recipe import AlignDataConfig
from workloads.common.recipe import RecipeError
from workloads.data.sources import read_path

KEYS = ("prompt", "chosen", "rejected")


def _kind(value: object) -> str | None:
    """`text`, `messages`, or None for anything else."""
    if isinstance(value, str):
        return "text"
    messages = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    return "messages" if messages else None


def check_pair(row: dict) -> str | None:
    """What is wrong with one row, or None: both answers present, every part text or every part chat messages."""
    missing = [key for key in ("chosen", "rejected") if key not in row]
    if missing:
        return f"no {' or '.join(missing)} (keys: {', '.join(map(str, row))})"
    kinds = {key: _kind(row[key]) for key in KEYS if key in row}
    bad = [key for key, kind in kinds.items() if kind is None]
    if bad:
        return f"{', '.join(bad)}: expected a string or a non-empty list of {{role, content}} messages"
    if len(set(kinds.values())) > 1:
        return f"mixes strings and messages ({', '.join(f'{k}: {v}' for k, v in kinds.items())})"
    if row["chosen"] == row["rejected"]:
        return "chosen and rejected are the same"
    return None


def read_pairs(path: str, field: str) -> list[dict]:
    """Every pair of one file (only the prompt/chosen/rejected keys); RecipeError names the field, row and problem."""
    rows = read_path(path, field=field)
    if not rows:
        raise RecipeError(f"field '{field}': {path} holds no rows")
    for number, row in enumerate(rows, 1):
        if problem := check_pair(row):
            raise RecipeError(f"field '{field}': {path} row {number}: {problem}")
    return [{key: row[key] for key in KEYS if key in row} for row in rows]


def split_pairs(cfg: AlignDataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out pairs: `eval_path`, else a seeded `eval_fraction` of `path`; `max_samples` caps
    the training pairs."""
    return hold_out(cfg, seed, read_pairs, "pairs")


def deal(rows: list, workers: int, equal: bool = False) -> list[list]:
    """`rows` dealt round-robin into one shard per worker (shard r: rows r, r + workers, ...), so a worker is handed
    only its own. `equal`: rows from the start are dealt again until every shard is as long as the first (as torch's
    DistributedSampler pads), so every worker takes as many batches per pass."""
    if equal and rows:
        rows = rows + (rows * workers)[: -len(rows) % workers]
    return [rows[r::workers] for r in range(workers)]


def hold_out(cfg: AlignDataConfig, seed: int, read, what: str) -> tuple[list, list]:
    """Training and held-out rows as `read(path, field)` gives them: `eval_path`'s rows, else a seeded
    `eval_fraction` of `path`'s; `max_samples` caps the training rows (pairs here, prompts for the RL methods)."""
    rows = read(cfg.path, "data.path")
    if cfg.eval_path is not None:
        train, held_out = rows, read(cfg.eval_path, "data.eval_path")
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(rows) * cfg.eval_fraction))
        held_out = [rows[i] for i in order[:n_eval]]
        train = [rows[i] for i in sorted(order[n_eval:])]
    if cfg.max_samples:
        train = train[: cfg.max_samples]
    if not train:
        raise RecipeError(f"field 'data.eval_fraction': holding out {cfg.eval_fraction} of {len(rows)} {what} leaves "
                          "none to train on")
    return train, held_out
