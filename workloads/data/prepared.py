"""What the tokenized data depends on (`fingerprint`), and the driver path's tokenized data kept between runs under
`$LLMC_CACHE/prepared` (`load`, `save`), as Axolotl keeps a prepared dataset: a rerun on unchanged data, settings and
tokenizer skips reading, checking and tokenizing it (and loading the tokenizer: seconds for every run, minutes for a
large dataset).

The kept data's key holds every data file's contents (the driver path reads them whole anyway) and a digest of the
code that reads, checks and tokenizes rows, so an edit to either makes the entry stale; data read from the hub is
never kept: nothing says it is unchanged. A streamed count's key (`fingerprint` alone) judges files by path, size and
modification time, as `make` does: it must not read them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workloads.common.paths import resolve_files, resolve_path
from workloads.data.recipe import DataConfig
from workloads.models.cache import cache_dir

# The code whose output is kept: a change to any of these files changes every key.
_CODE = [*sorted(Path(__file__).parent.glob("*.py")), Path(__file__).parent.parent / "finetune" / "evaluation.py"]


@dataclass(frozen=True)
class PreparedData:
    """A run's tokenized data as the driver made it, and the line that described its files. Kept as JSON (not
    pickle): a shared $LLMC_CACHE cannot hand a run code to execute."""

    description: str
    data: dict[str, Any]  # JSON values only: train and eval examples, eval generation cases as (ids, reference)


def fingerprint(cfg: DataConfig, seed: int, tokenizer_args: tuple, ignore: dict | None = None,
                extra: dict | None = None) -> str | None:
    """What data made from `cfg` depends on, hashed: the data config (less the `ignore` fields, a pydantic exclude),
    the seed, the tokenizer (its model's tokenizer files' sizes and mtimes, when a local directory), each file read
    (path, size, mtime) and `extra`. None when a dataset comes from the hub."""
    if any(source.hub is not None for _, source in cfg.sources()):
        return None
    model = Path(tokenizer_args[0])
    tokenizer_files = sorted(p for p in model.iterdir() if p.name.startswith("tokenizer") or p.suffix == ".jinja") \
        if model.is_dir() else []
    identity = {"data": cfg.model_dump(mode="json", exclude={"cache": True, **(ignore or {})}),
                "seed": seed, "tokenizer": [*map(str, tokenizer_args), *_stats(map(str, tokenizer_files))],
                "files": _stats(_files(cfg)), **({"extra": extra} if extra else {})}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def key(cfg: DataConfig, seed: int, tokenizer_args: tuple, generation: dict) -> str | None:
    """The driver path's key (`generation`: the eval settings its generation cases depend on); None when the data
    is not to be kept (data.cache off, a hub dataset or tokenizer)."""
    if not cfg.cache or not Path(tokenizer_args[0]).is_dir():
        return None
    if any(source.hub is not None for _, source in cfg.sources()):
        return None  # before `_files`: a hub dataset has no file to read
    # The driver path reads every file whole anyway: their contents, not only their mtimes (a clock tick apart, two
    # writes of the same size look alike), and the code's.
    contents = [_digest([file]) for file, _, _ in _stats(_files(cfg))]
    return fingerprint(cfg, seed, tokenizer_args, ignore={"streaming": True},
                       extra={"generation": generation, "contents": contents, "code": _digest(_CODE)})


def load(data_key: str | None) -> PreparedData | None:
    """The data kept under `data_key`, if any."""
    path = _path(data_key)
    if path is None or not path.is_file():
        return None
    kept = json.loads(path.read_text())
    return PreparedData(kept["description"], kept["data"])


def save(data_key: str | None, prepared: PreparedData) -> None:
    """Keeps `prepared` under `data_key` (nothing when None): whole or absent, for a run reading it meanwhile."""
    path = _path(data_key)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps({"description": prepared.description, "data": prepared.data}))
    partial.replace(path)


def _path(data_key: str | None) -> Path | None:
    return cache_dir() / "prepared" / f"{data_key}.json" if data_key else None


def _files(cfg: DataConfig) -> list[str]:
    """Every file (or save_to_disk directory) the data is read from, eval files included."""
    files = []
    for _, source in cfg.sources():
        paths = [str(p) for pattern in source.data_files for p in resolve_files(pattern)] if source.data_files \
            else [str(resolve_path(source.path))]
        files += [*paths, *([str(resolve_path(source.eval_path))] if source.eval_path else [])]
    return files


def _digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _stats(paths) -> list:
    """(path, size, mtime) of each file, of each file under a directory (a save_to_disk dataset)."""
    out = []
    for path in map(Path, paths):
        for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            stat = file.stat()
            out.append((str(file), stat.st_size, stat.st_mtime_ns))
    return out
