"""Where training rows come from, and how several datasets become one training set.

Files (JSON, JSONL, Parquet, CSV), globs of files, `save_to_disk` directories and hub datasets are all read
through Hugging Face `datasets`, so a recipe reads its data as the ecosystem's tools do; `columns` renames a
dataset's columns to its format's fields; `mix` draws several datasets to their weights. Reading errors are
`RecipeError`s naming the recipe field and the file or dataset at fault.
"""

from __future__ import annotations

import csv
import random
import urllib.error
import urllib.request
from pathlib import Path

from workloads.common.paths import resolve_files, resolve_path
from workloads.common.recipe import RecipeError
from workloads.data.recipe import DatasetConfig

HUB_PROBE_TIMEOUT_S = 5.0  # a hub that does not answer this fast is unreachable (datasets itself retries ~25 s)
_SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def builder_for(path: Path, builder: str | None = None) -> str:
    """The `datasets` builder that reads `path`: the one given, else by suffix (JSON for any other suffix)."""
    return builder or _SUFFIX_BUILDERS.get(path.suffix.lower(), "json")


def read_source(source: DatasetConfig, prefix: str = "data", eval_file: bool = False) -> list[dict]:
    """Every row of one dataset (or of its `eval_path`), columns not yet mapped; `prefix` names it in errors."""
    if eval_file:
        return read_path(source.eval_path, source.builder, field=f"{prefix}.eval_path")
    if source.hub is not None:
        return read_hub(source.hub, source.subset, source.split, prefix)
    if source.data_files is not None:
        files = [path for pattern in source.data_files for path in resolve_files(pattern)]
        if not files:
            raise RecipeError(f"field '{prefix}.data_files': no file matches {source.data_files}")
        return _read_files(files, source.builder, f"{prefix}.data_files")
    return read_path(source.path, source.builder, source.split, f"{prefix}.path")


def read_path(path: str, builder: str | None = None, split: str = "train", field: str = "data.path") -> list[dict]:
    """Rows of one file, or of the `split` of a `save_to_disk` directory."""
    resolved = resolve_path(path)
    if resolved is None:
        raise RecipeError(f"field '{field}': {path!r} not found")
    if resolved.is_dir():
        return _read_saved(resolved, split, field)
    return _read_files([resolved], builder, field)


def read_hub(name: str, subset: str | None, split: str, prefix: str = "data") -> list[dict]:
    """Rows of a hub dataset; an unreachable hub fails within HUB_PROBE_TIMEOUT_S, not after datasets' retries."""
    return list(open_hub(name, subset, split, prefix))


def open_hub(name: str, subset: str | None, split: str, prefix: str = "data", streaming: bool = False):
    """A hub dataset as a `datasets` Dataset (or, `streaming`, an IterableDataset that reads as it is iterated)."""
    import datasets
    import datasets.config

    if not datasets.config.HF_HUB_OFFLINE:
        _probe_hub(f"{prefix}.hub")
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(name, subset, split=split, streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - whatever the hub or its cache says, it is this field's dataset
        raise RecipeError(f"field '{prefix}.hub': hub dataset {name!r} (subset {subset}, split {split!r}) cannot be "
                          f"read: {_cause(exc)}") from None


def missing_column(row: dict, columns: dict[str, str]) -> str | None:
    """Which mapped column `row` lacks, said with the field it maps to and the columns it has; None if none."""
    for name, column in columns.items():
        if column not in row:
            return f"column '{column}' (mapped to '{name}') is missing; the row's columns: {', '.join(map(str, row))}"
    return None


def map_columns(row: dict, columns: dict[str, str]) -> dict:
    """`row` with each format field taken from the column `columns` names for it; other columns are kept."""
    if not columns:
        return row
    if problem := missing_column(row, columns):
        raise ValueError(problem)
    return {**row, **{name: row[column] for name, column in columns.items()}}


def mix(parts: list[list], weights: list[float], seed: int) -> list:
    """Items of several datasets to their weights (see `DataConfig.datasets`): each contributes
    round(weight / sum(weights) x N) of N = all items, as whole passes plus a seeded sample; then shuffled."""
    total, weight_sum = sum(map(len, parts)), sum(weights)
    rng = random.Random(seed)
    mixed: list = []
    for part, weight in zip(parts, weights, strict=True):
        whole, rest = divmod(round(weight / weight_sum * total), len(part))
        mixed += part * whole + rng.sample(part, rest)
    rng.shuffle(mixed)
    return mixed


def _read_files(files: list[Path], builder: str | None, field: str) -> list[dict]:
    import datasets

    builder = builder_for(files[0], builder)
    where = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
    try:
        kwargs = _csv_as_text(files[0]) if builder == "csv" else {}
        datasets.disable_progress_bars()
        return list(datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs))
    except Exception as exc:  # noqa: BLE001 - any reader error is the file's fault here
        raise RecipeError(f"field '{field}': {where} is not a readable {builder.upper()} file: {_cause(exc)}") from None


def _csv_as_text(first: Path) -> dict:
    """load_dataset kwargs that read every CSV column as text: pandas would make '5' an int and '' a NaN."""
    import datasets

    with first.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise ValueError("it has no header row")
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False}


def _read_saved(directory: Path, split: str, field: str) -> list[dict]:
    return list(open_saved(directory, split, field))


def open_saved(directory: Path, split: str, field: str):
    """A `save_to_disk` directory's dataset (its `split`, if it holds several), memory-mapped: no row is read yet."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as exc:  # noqa: BLE001 - not a saved dataset, whatever the reason
        raise RecipeError(f"field '{field}': {directory} is not a dataset written by save_to_disk: {_cause(exc)}") \
            from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            split_field = field.rsplit(".", 1)[0] + ".split"
            raise RecipeError(f"field '{split_field}': {directory} has no split {split!r}; allowed: {sorted(loaded)}")
        loaded = loaded[split]
    return loaded


def _probe_hub(field: str) -> None:
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as exc:  # unresolvable, refused, timed out, or not a URL
        reason = getattr(exc, "reason", exc)
        raise RecipeError(
            f"field '{field}': the dataset hub {endpoint} cannot be reached from this machine ({reason}). Save the "
            "dataset with save_to_disk where the hub is reachable and set path to that directory, or set "
            "HF_HUB_OFFLINE=1 to read it from this machine's hub cache"
        ) from None


def _cause(exc: BaseException) -> str:
    """The innermost error's message: `datasets` wraps the reader's own (pandas, pyarrow) in generic ones."""
    for _ in range(8):  # a chain, never a cycle, but bounded all the same
        if (inner := exc.__cause__ or exc.__context__) is None:
            break
        exc = inner
    return f"{type(exc).__name__}: {exc}"
