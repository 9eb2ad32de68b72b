"""The row -> tokens steps of the streaming data path (`data.streaming`), as plain functions of a batch of rows.

Ray Data (`workloads.data.pipeline`) runs them in `map_batches` on the cluster's CPUs; nothing here imports Ray.
Each step reuses the driver path's own pieces (`map_columns`, `row_problem`, `tokenize_examples`, `pack`), so a
streamed example is token for token the example the driver path makes of the same row.
"""

from __future__ import annotations

import functools
import hashlib
import json

from workloads.common.recipe import RecipeError
from workloads.data.check import row_problem
from workloads.data.formats import pack, tokenize_examples
from workloads.data.recipe import FORMAT_FIELDS, DataConfig, DatasetConfig
from workloads.data.sources import map_columns, missing_column


def held_out(row: dict, fmt: str, seed: int, fraction: float) -> bool:
    """Whether a (column-mapped) row belongs to the eval split: a seeded hash of its format's fields below
    `fraction`. Decided by the row alone, so every pass and every reader agrees without counting or shuffling rows."""
    if fraction <= 0:
        return False
    key = json.dumps([row.get(name) for name in FORMAT_FIELDS[fmt]], sort_keys=True, default=str)
    digest = hashlib.blake2b(key.encode(), digest_size=8, salt=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def checked_rows(rows: list[dict], source: DatasetConfig, field: str, label: str) -> list[dict]:
    """`rows` with their columns mapped; the first row a worker could not train on is a `RecipeError` worded as the
    driver's check words it (field, dataset, what the row lacks), quoting the row, since a stream has no line number."""
    mapped = []
    for row in rows:
        problem = missing_column(row, source.columns) if source.columns else None
        if problem is None:
            row = map_columns(row, source.columns)
            problem = row_problem(row, source.format)
        if problem is not None:
            raise RecipeError(f"field '{field}': {label} cannot be used as format '{source.format}' (found while "
                              f"streaming)\n  row {json.dumps(row, default=str)[:200]}: {problem}")
        mapped.append(row)
    return mapped


def examples(rows: list[dict], cfg: DataConfig, source: DatasetConfig, field: str, label: str, *, seed: int,
             eval_split: bool, tokenizer_args: tuple) -> list[dict]:
    """A batch of raw rows of one dataset -> its examples (input_ids, labels) of the train or eval split.

    A dataset with its own eval file keeps every row of each file; else `held_out` picks the eval rows.
    `tokenizer_args`: `load_tokenizer`'s arguments (loaded once per process)."""
    mapped = checked_rows(rows, source, field, label)
    if not source.eval_path:
        mapped = [r for r in mapped if held_out(r, source.format, seed, cfg.eval_fraction) == eval_split]
    return tokenize_examples(mapped, source.format, cfg, _tokenizer(*tokenizer_args))


def packed(examples_: list[dict], max_length: int) -> list[dict]:
    """A batch of examples packed into blocks (`formats.pack`): packing streams one batch at a time."""
    return pack(examples_, max_length)


@functools.lru_cache(maxsize=2)
def _tokenizer(model_path: str, revision: str | None, chat_template: str | None):
    from workloads.models.loading import load_tokenizer

    return load_tokenizer(model_path, revision, chat_template)
