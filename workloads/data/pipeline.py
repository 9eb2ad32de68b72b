"""The streaming data path (`data.streaming.enabled`): a recipe's datasets as Ray Data pipelines that read, check,
tokenize (and pack) on the cluster's CPUs, for Ray Train workers to stream their shards of (`cluster.train.fit`'s
`datasets`). The driver holds no rows.

What differs from the driver path (`formats.build_datasets`), because nothing is materialized:
- the eval split of a dataset without `eval_path` is the rows whose seeded hash falls below `eval_fraction`
  (`stream.held_out`): about that share, the same rows on every pass;
- shuffling is the files' order (seeded) and each worker's local buffer (`data.streaming.shuffle_buffer_rows`,
  seeded with train.seed + epoch), not a permutation of the whole set;
- a mix (`data.datasets`) counts each dataset once, repeats whole passes as the driver path does and samples the
  rest with a seeded Bernoulli draw (about that many rows); `max_samples` keeps the first N examples;
- packing packs the examples of one tokenization batch (`data.streaming.batch_rows`) at a time.

Counting (num_epochs, a mix's shares) streams a pass whose rows are not kept; its result is cached under
`$LLMC_CACHE/data-counts`, keyed by the data config, the seed, the tokenizer and every file's path, size and mtime, so
a second run on unchanged data counts nothing (hub datasets are counted every time: nothing says they are unchanged).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from cluster import data as cluster_data
from workloads.common.paths import resolve_files, resolve_path
from workloads.data import stream
from workloads.data.prepared import fingerprint
from workloads.data.recipe import DataConfig, DatasetConfig
from workloads.data.sources import builder_for, open_hub, open_saved
from workloads.models.cache import cache_dir


@dataclass(frozen=True)
class Streams:
    """The train and eval pipelines of a recipe's data, and the train examples of one pass when counted."""

    train: Any  # a Ray Data dataset (`cluster.data`) of examples: input_ids, labels (and position_ids, packed)
    eval: Any | None
    train_examples: int | None
    counted: str = ""  # how train_examples was known: "counted", "cached" (an earlier run's count), "" (not counted)


def build(cfg: DataConfig, seed: int, tokenizer_args: tuple, count: bool) -> Streams:
    """The recipe's pipelines; `count`: count the train examples of one pass (a streamed pass whose rows are not
    kept), as the run's length in epochs needs. A mix always counts its datasets."""
    parts, evals = [], []
    counts = _Counts(cfg, seed, tokenizer_args)
    for prefix, source in cfg.sources():
        step = {"cfg": cfg, "source": source, "seed": seed, "tokenizer_args": tokenizer_args}
        field, label, raw = _read(source, prefix, seed, cfg.streaming.max_cpus)
        train = cluster_data.map_rows(raw, stream.examples, batch_rows=cfg.streaming.batch_rows, field=field,
                                      label=label, eval_split=False, **step)
        parts.append(cluster_data.limit(train, cfg.max_samples) if cfg.max_samples else train)
        if source.eval_path:
            field, label = f"{prefix}.eval_path", source.eval_path
            raw = _read_path(source.eval_path, source, seed, field, cfg.streaming.max_cpus)
        if source.eval_path or cfg.eval_fraction > 0:
            evals.append(cluster_data.map_rows(raw, stream.examples, batch_rows=cfg.streaming.batch_rows,
                                               field=field, label=label, eval_split=True, **step))
    weights = [source.weight for _, source in cfg.sources()]
    train = cluster_data.union(_mix(parts, weights, seed, counts) if len(parts) > 1 else parts)
    evaluation = cluster_data.union(evals) if evals else None
    if cfg.packing:
        train, evaluation = (None if ds is None else cluster_data.map_rows(
            ds, stream.packed, batch_rows=cfg.streaming.batch_rows, max_length=cfg.max_length)
            for ds in (train, evaluation))
    examples = counts.count(train, "train") if count else None
    if examples == 0:
        raise ValueError(f"data: no example has a trainable token within max_length ({cfg.max_length})")
    return Streams(train, evaluation, examples, ("cached" if counts.cached else "counted") if count else "")


def eval_records(cfg: DataConfig, seed: int):
    """(format, record) of every dataset's eval rows, in order, streamed: for eval generation's first cases."""
    def rows(prefix: str, source: DatasetConfig):
        if source.eval_path:
            field, label = f"{prefix}.eval_path", source.eval_path
            raw = _read_path(source.eval_path, source, seed, field, cfg.streaming.max_cpus)
            kept = cluster_data.map_rows(raw, stream.checked_rows, batch_rows=cfg.streaming.batch_rows,
                                         source=source, field=field, label=label)
        else:
            field, label, raw = _read(source, prefix, seed, cfg.streaming.max_cpus)
            kept = cluster_data.map_rows(raw, _held_out_rows, batch_rows=cfg.streaming.batch_rows, source=source,
                                         field=field, label=label, seed=seed, fraction=cfg.eval_fraction)
        return ((source.format, row) for row in cluster_data.iter_rows(kept))

    return chain.from_iterable(rows(prefix, source) for prefix, source in cfg.sources()
                               if source.eval_path or cfg.eval_fraction > 0)


def _held_out_rows(rows: list[dict], source: DatasetConfig, field: str, label: str, seed: int,
                   fraction: float) -> list[dict]:
    return [r for r in stream.checked_rows(rows, source, field, label) if stream.held_out(r, source.format, seed,
                                                                                          fraction)]


class _Counts:
    """Counted passes, each cached by what decides its result (`key`): none when a dataset is read from the hub."""

    def __init__(self, cfg: DataConfig, seed: int, tokenizer_args: tuple):
        self.key, self.cached = count_key(cfg, seed, tokenizer_args), True

    def count(self, ds, what: str) -> int:
        """The rows of one pass of `ds` (`what` names it within the data: "train", "part-0", ...)."""
        path = cache_dir() / "data-counts" / f"{self.key}-{what}.json" if self.key else None
        if path is not None and path.is_file():
            return json.loads(path.read_text())["rows"]
        self.cached, rows = False, cluster_data.count(ds)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            partial.write_text(json.dumps({"rows": rows}))
            partial.replace(path)  # whole or absent, for a run reading it meanwhile
        return rows


def count_key(cfg: DataConfig, seed: int, tokenizer_args: tuple) -> str | None:
    """What a count of the streamed examples depends on (`prepared.fingerprint`): the data config but the fields that
    only say how to stream it, the seed, the tokenizer and each file read. None when a dataset comes from the hub."""
    return fingerprint(cfg, seed, tokenizer_args,
                       ignore={"streaming": {"enabled", "check_rows", "shuffle_buffer_rows", "max_cpus"}})


def _mix(parts: list, weights: list[float], seed: int, counts: _Counts) -> list:
    """Each dataset's share of the mix (see `DataConfig.datasets`): whole passes, then a seeded sample of the rest."""
    sizes = [counts.count(part, f"part-{i}") for i, part in enumerate(parts)]
    total, weight_sum, mixed = sum(sizes), sum(weights), []
    for i, (part, size, weight) in enumerate(zip(parts, sizes, weights, strict=True)):
        if size == 0:
            continue
        whole, rest = divmod(round(weight / weight_sum * total), size)
        mixed += [part] * whole + ([cluster_data.sample(part, rest / size, seed + i)] if rest else [])
    return mixed


def _read(source: DatasetConfig, prefix: str, seed: int, max_cpus: int | None) -> tuple[str, str, Any]:
    """(field, label, raw rows) of one dataset: its path, data_files or hub dataset; what is made from it holds at
    most `max_cpus` CPUs at once (`data.streaming.max_cpus`)."""
    if source.hub is not None:
        label = f"{source.hub}:{source.split}"
        raw = cluster_data.read_iterable(open_hub(source.hub, source.subset, source.split, prefix, streaming=True))
        return f"{prefix}.hub", label, cluster_data.cap_cpus(raw, max_cpus)
    if source.data_files is not None:
        files = [str(path) for pattern in source.data_files for path in resolve_files(pattern)]
        raw = _read_files(files, source, seed)
        return f"{prefix}.data_files", ", ".join(source.data_files), cluster_data.cap_cpus(raw, max_cpus)
    return f"{prefix}.path", source.path, _read_path(source.path, source, seed, f"{prefix}.path", max_cpus)


def _read_path(path: str, source: DatasetConfig, seed: int, field: str, max_cpus: int | None):
    resolved = resolve_path(path)
    if resolved.is_dir():  # a save_to_disk directory: its Arrow files, read as they stream
        raw = cluster_data.read_iterable(open_saved(resolved, source.split, field).to_iterable_dataset())
    else:
        raw = _read_files([str(resolved)], source, seed)
    return cluster_data.cap_cpus(raw, max_cpus)


def _read_files(files: list[str], source: DatasetConfig, seed: int):
    reader = builder_for(Path(files[0]), source.builder)
    header = None
    if reader == "csv":  # read as text, as `sources` reads a CSV: its header names the columns
        with open(files[0], newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    return cluster_data.read_files(reader, files, shuffle_seed=seed, text_columns=header)
