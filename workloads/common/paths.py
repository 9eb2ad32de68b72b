"""Where files are looked up: the repository root, and data or recipe paths as given or else relative to it."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

from pydantic import ValidationInfo

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_files(pattern: str) -> list[Path]:
    """Files matching a path or glob pattern, as given or else relative to the repository; sorted."""
    given = Path(pattern).expanduser()
    for base in (Path.cwd(), REPO_ROOT):
        full = given if given.is_absolute() else base / given
        matches = sorted(Path(p).resolve() for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        if matches:
            return matches
    return []


_FALLBACKS_SAID: set[str] = set()
# Validation context of a recipe the driver already checked and whose data it read (a train worker's copy): its data
# paths are not looked up again, since on another node of a cluster they need not exist.
PATHS_CHECKED = {"paths_checked": True}


def paths_checked(info: ValidationInfo) -> bool:
    """Whether a validator is told (`PATHS_CHECKED`) that the driver has already looked its paths up."""
    return bool(info.context and info.context.get("paths_checked"))


def resolve_path(value: str) -> Path | None:
    """A data or recipe path as given, else relative to the repository (said once on stderr); None if neither."""
    given = Path(value).expanduser()
    if given.exists():
        return given.resolve()
    bundled = REPO_ROOT / value
    if not given.is_absolute() and bundled.exists():
        if value not in _FALLBACKS_SAID:
            _FALLBACKS_SAID.add(value)
            print(f"[llmc] {value!r} is not under {Path.cwd()}: using the repository's {bundled}", file=sys.stderr)
        return bundled.resolve()
    return None
