"""The data plan `llmc validate` prints: each dataset's files, their size and estimated rows, and where reading and
tokenization run (the driver, or Ray Data on the cluster with data.streaming). Read from file metadata and the first
MiB of each file, so a corpus of tens of GB is planned in well under a second; no tokenizer, no Ray."""

from __future__ import annotations

from pathlib import Path

from workloads.common.paths import resolve_files, resolve_path
from workloads.data.recipe import DataConfig, DatasetConfig
from workloads.data.sources import builder_for, open_saved

_SAMPLE_BYTES = 1 << 20  # rows of a larger text file are estimated from its first MiB


def data_plan(cfg: DataConfig) -> dict:
    """Sources (field, files, bytes, estimated rows and how each was estimated), the estimated rows in all, and where
    the rows are read and tokenized."""
    sources = []
    for prefix, source in cfg.sources():
        sources.append(_source_plan(f"{prefix}.{_kind(source)}", source, _location(source), source.split))
        if source.eval_path:
            sources.append(_source_plan(f"{prefix}.eval_path", source, source.eval_path, "train"))
    stream = cfg.streaming
    where = (f"Ray Data on the cluster's CPUs: files read in parallel, rows checked and tokenized in map_batches of "
             f"{stream.batch_rows} rows{', packed per batch' if cfg.packing else ''}; each training worker streams "
             f"its shard (ray.train.get_dataset_shard); the driver checks the first {stream.check_rows} rows of each "
             "dataset and holds no rows" if stream.enabled else
             "the driver: every row read, checked and tokenized in one process before Ray starts; each training "
             "worker gets a copy of all of it from the object store")
    known = [s["estimated_rows"] for s in sources]
    return {"streaming": stream.enabled, "tokenization": where, "sources": sources,
            "estimated_rows": sum(known) if None not in known else None}


def _kind(source: DatasetConfig) -> str:
    return next(name for name in ("path", "data_files", "hub") if getattr(source, name) is not None)


def _location(source: DatasetConfig) -> str:
    return source.path or source.hub or ", ".join(source.data_files or [])


def _source_plan(field: str, source: DatasetConfig, location: str, split: str) -> dict:
    plan = {"field": field, "source": location, "format": source.format}
    if source.hub is not None and not field.endswith("eval_path"):
        return {**plan, "reader": "hub", "files": None, "bytes": None, "estimated_rows": None,
                "estimate": "unknown until read (hub dataset)"}
    files = ([resolve_path(location)] if field.endswith(("path", "eval_path")) else
             [p for pattern in source.data_files or [] for p in resolve_files(pattern)])
    if len(files) == 1 and files[0].is_dir():
        saved = open_saved(files[0], split, field)
        return {**plan, "reader": "save_to_disk", "files": len(saved.cache_files), "bytes": saved.data.nbytes,
                "estimated_rows": len(saved), "estimate": "exact (dataset metadata)"}
    reader = builder_for(files[0], source.builder)
    rows = [_rows(path, reader) for path in files]
    how = {"parquet": "exact (Parquet metadata)"}.get(reader, f"from the rows in each file's first "
                                                             f"{_SAMPLE_BYTES >> 20} MiB (exact for smaller files)")
    return {**plan, "reader": reader, "files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "estimated_rows": None if None in rows else sum(rows), "estimate": how}


def _rows(path: Path, reader: str) -> int | None:
    """Rows of one file: Parquet's metadata, else newline-counted in the first MiB and scaled to the file's size."""
    if reader == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    size = path.stat().st_size
    with path.open("rb") as handle:
        sample = handle.read(_SAMPLE_BYTES)
    if reader == "json" and sample.lstrip().startswith(b"["):
        return None  # a JSON list: its rows are not lines
    lines = sample.count(b"\n") + (not sample.endswith(b"\n") and len(sample) == size and bool(sample.strip()))
    lines -= reader == "csv"  # the header
    return lines if len(sample) == size else round(lines * size / len(sample))
