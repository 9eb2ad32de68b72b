"""Ray Data for training input: read files in parallel, map batches of rows on the cluster's CPUs, and hand each Ray
Train worker its shard (`fit(datasets=...)` in `cluster.train`, `shard_batches` on the worker).

Rows cross this module as plain dicts (lists of them per batch), so the caller's functions stay plain Python. Every
dataset made here keeps its order (`preserve_order`): a pass reads its files in the seeded order given, one after the
other, so what a pass holds does not depend on which task finished first. An exception raised by the caller's
function reaches the caller as itself, not wrapped in Ray's errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow
import ray
import ray.data
import ray.train
from ray.data.datasource import FileShuffleConfig

Rows = list[dict]


def read_files(reader: str, paths: list[str], *, shuffle_seed: int | None = None,
               text_columns: list[str] | None = None) -> ray.data.Dataset:
    """JSON/JSONL (`json`), CSV (`csv`, its `text_columns` read as text, empty cells as '') or Parquet files, read in
    parallel as they stream; `shuffle_seed` reads the files in a seeded order."""
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None and len(paths) > 1 else None
    if reader == "parquet":
        ds = ray.data.read_parquet(paths, shuffle=shuffle)
    elif reader == "csv":
        import pyarrow.csv

        types = {name: pyarrow.string() for name in text_columns or []}
        ds = ray.data.read_csv(paths, shuffle=shuffle, file_extensions=None,
                               convert_options=pyarrow.csv.ConvertOptions(column_types=types,
                                                                          strings_can_be_null=False))
    else:
        ds = ray.data.read_json(paths, shuffle=shuffle, file_extensions=None)
    return _ordered(ds)


def read_iterable(dataset: Any) -> ray.data.Dataset:
    """A Hugging Face `datasets.IterableDataset` (a saved dataset's or a hub dataset's), read as it streams."""
    return _ordered(ray.data.from_huggingface(dataset))


def map_rows(ds: ray.data.Dataset, fn: Callable[..., Rows], *, batch_rows: int, **kwargs) -> ray.data.Dataset:
    """`fn(rows, **kwargs) -> rows` on every batch of `batch_rows` rows, in Ray Data tasks on the cluster's CPUs."""
    return ds.map_batches(_RowsFn(fn, kwargs), batch_size=batch_rows, batch_format="pyarrow")


def union(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    """The datasets one after the other."""
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def sample(ds: ray.data.Dataset, fraction: float, seed: int) -> ray.data.Dataset:
    """A seeded Bernoulli sample: each row kept with probability `fraction`."""
    return ds.random_sample(fraction, seed=seed)


def limit(ds: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """The first `rows` rows."""
    return ds.limit(rows)


def cap_cpus(ds: ray.data.Dataset, cpus: int | None) -> ray.data.Dataset:
    """At most `cpus` CPUs held by the dataset's tasks at once (None: Ray Data's own limit, the cluster's CPUs). It
    applies to the datasets `ds` was made from and to those made from it (they share its options)."""
    if cpus is not None:
        ds.context.execution_options.resource_limits = ray.data.ExecutionResources(cpu=cpus)
    return ds


def count(ds: ray.data.Dataset) -> int:
    """The rows of one pass, counted as they stream (none are kept)."""
    with _unwrapped():
        return ds.count()


def iter_rows(ds: ray.data.Dataset) -> Iterator[dict]:
    """The rows of one pass, in order, to the caller (stop early to read no further)."""
    with _unwrapped():
        yield from ds.iter_rows()


def _ordered(ds: ray.data.Dataset) -> ray.data.Dataset:
    ds.context.execution_options.preserve_order = True
    return ds


class _RowsFn:
    """A batch function over pyarrow batches that calls `fn` on plain rows (picklable, for Ray Data's tasks)."""

    def __init__(self, fn: Callable[..., Rows], kwargs: dict):
        self.fn, self.kwargs = fn, kwargs

    def __call__(self, batch: pyarrow.Table) -> pyarrow.Table:
        rows = self.fn(batch.to_pylist(), **self.kwargs)
        return pyarrow.Table.from_pylist(rows) if rows else pyarrow.table({})


@contextlib.contextmanager
def _unwrapped() -> Iterator[None]:
    """Re-raise the caller's own exception from a Ray Data task, instead of Ray's wrappers around it."""
    try:
        yield
    except ray.exceptions.RayError as error:
        cause = _own_cause(error)
        if cause is None:
            raise
        raise cause from None


def _own_cause(error: BaseException) -> BaseException | None:
    for _ in range(16):  # a chain, never a cycle, but bounded all the same
        inner = getattr(error, "cause", None) or error.__cause__ or error.__context__
        if inner is None:
            return None
        if not isinstance(inner, ray.exceptions.RayError):
            return inner
        error = inner
    return None


# -------------------------------------------------------------------------------------------
# Worker side: called from inside the train loop.
# -------------------------------------------------------------------------------------------


def has_shard(name: str) -> bool:
    """Whether the run was given a dataset `name` (`fit(datasets=...)`)."""
    try:
        return ray.train.get_dataset_shard(name) is not None
    except KeyError:
        return False


def shard_batches(name: str, batch_rows: int, *, shuffle_buffer_rows: int | None = None,
                  shuffle_seed: int | None = None, drop_last: bool = True) -> Iterator[Rows]:
    """One pass over this worker's shard of dataset `name`, `batch_rows` rows at a time (with `drop_last`, a last,
    smaller batch is dropped), shuffled within a local buffer when `shuffle_buffer_rows` is given.

    Every worker's shard holds as many rows as every other's (Ray Train splits with `equal=True`, dropping fewer
    rows than there are workers), so all of them make the same number of batches. A pass is a barrier: it starts
    when every worker has asked for it."""
    shard = ray.train.get_dataset_shard(name)
    batches = shard.iter_batches(batch_size=batch_rows, batch_format="pyarrow", drop_last=drop_last,
                                 local_shuffle_buffer_size=shuffle_buffer_rows, local_shuffle_seed=shuffle_seed)
    with _unwrapped():
        for batch in batches:
            yield batch.to_pylist()
