"""The model cache: where built and converted models live, a lock so concurrent first uses wait for one build,
and file digests."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where built models live: $LLMC_CACHE or ~/.cache/llmcluster."""
    return Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmcluster")).expanduser()


def build_once(target: Path, ready: Path, build: Callable[[], None]) -> Path:
    """`target`, built by `build` unless `ready` exists; a lock beside it makes concurrent first uses wait for one
    build (the tiny model, a real model's GGUF and its conversion)."""
    if not ready.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not ready.exists():
                build()
    return target


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
