"""Which stages a rerun may skip: each stage's key (a hash of its inputs) and outputs from its last finished run,
kept in `<pipeline run dir>/pipeline_state.json`.

A stage's key covers its resolved recipe (after references are substituted), the digests of the data files that
recipe reads (record.data_digest) and the digests of the upstream outputs it references (an adapter directory's
files, a number's value). So changing a stage's data reruns it, and its new artifact changes the key of every stage
that reads it, while stages before it stay skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from workloads.common import record
from workloads.pipeline.outputs import OUTPUT_DIR
from workloads.pipeline.references import Reference

STATE_FILE = "pipeline_state.json"


def stage_key(resolved: dict, reads: list[Reference], outputs: dict[str, dict[str, Any]]) -> str:
    """The hash of a stage's inputs: its resolved recipe, its data's digest and each referenced output's digest."""
    upstream = {ref.text: _digest(outputs[ref.stage][ref.key]) for ref in reads}
    inputs = {"recipe": resolved, "data": record.data_digest(resolved), "upstream": upstream}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def forced_stages(names: list[str], start_from: str | None) -> set[str]:
    """The stages `--from STAGE` runs whatever their keys: that stage and every later one (none without it)."""
    return set(names[names.index(start_from):]) if start_from is not None else set()


def _digest(value: Any) -> str:
    """A file's or directory's content digest when the output is a path that exists, else the value itself."""
    if isinstance(value, str) and value and Path(value).exists():
        return record.model_digest(value)
    return json.dumps(value, sort_keys=True, default=str)


class PipelineState:
    """The stages' keys and outputs from their last finished runs, read from and written to one JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict[str, Any]] = json.loads(path.read_text())["stages"] if path.is_file() else {}

    def unchanged(self, name: str, key: str) -> bool:
        """Whether the stage last finished with this key and its output directory is still there."""
        entry = self.stages.get(name)
        return entry is not None and entry["key"] == key and Path(entry["outputs"][OUTPUT_DIR]).is_dir()

    def outputs(self, name: str) -> dict[str, Any]:
        return self.stages[name]["outputs"]

    def finished(self, name: str, key: str, outputs: dict[str, Any]) -> None:
        """Record a stage's finished run and write the file at once (a later stage's failure keeps it)."""
        self.stages[name] = {"key": key, "outputs": outputs}
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps({"stages": self.stages}, indent=2, default=str))
        os.replace(partial, self.path)
