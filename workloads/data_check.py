"""Read a recipe's data on the driver, before Ray starts, and say exactly what no worker could train on.

A dataset that cannot be read, is empty, or whose rows lack what the format needs is a `RecipeError`
(exit 2) naming the file, the line or row, and the field or value at fault: a handful of examples and a
count of the rest. Rows that are only too long are counted and reported; fatal only if none remain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workloads.config import DataConfig, RecipeError, resolve_path

SHOWN = 5  # problems listed one by one; the rest are counted
_ROLES = {"system", "user", "assistant"}


@dataclass
class FileReport:
    """What a data file holds: rows read, rows usable, rows cut away by max_length."""

    path: str
    rows: int = 0
    too_long: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return self.rows - self.too_long


def read_rows(path: Path) -> tuple[list[tuple[str, object]], list[str]]:
    """(where, row) for every row of a JSONL, JSON or Parquet file, and the rows that could not be parsed."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            return [(f"row {i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())], []
        except Exception as exc:  # noqa: BLE001 - any reader error is the file's fault here
            return [], [f"not a readable Parquet file ({exc})"]
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON list of rows; else JSON lines
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return [], [f"line {exc.lineno}: not valid JSON ({exc.msg})"]
        return [(f"row {i + 1}", row) for i, row in enumerate(data)], []
    rows, broken = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            broken.append(f"line {number}: not valid JSON ({exc.msg})")
    return rows, broken


def row_problem(row: object, fmt: str) -> str | None:
    """What `row` lacks for `fmt`, naming the field; None when it can be rendered."""
    if not isinstance(row, dict):
        return f"a row is a JSON object, got {type(row).__name__}"
    if fmt == "alpaca":
        for name, required in (("instruction", True), ("output", True), ("input", False)):
            if name not in row or row[name] is None:
                if required:
                    return f"field '{name}' is missing"
            elif not isinstance(row[name], str):
                return f"field '{name}' must be a string, got {type(row[name]).__name__} {row[name]!r:.40}"
        return None if row["instruction"].strip() else "field 'instruction' is empty"
    if fmt == "text":
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            return "field 'text' is missing or not a non-empty string"
        return None
    key, role_key, text_key, roles = {
        "messages": ("messages", "role", "content", _ROLES),
        "sharegpt": ("conversations", "from", "value", {"human", "user", "gpt", "assistant", "system", "model"}),
    }[fmt]
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        return f"field '{key}' must be a non-empty list of turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get(role_key) not in roles:
            got = turn.get(role_key) if isinstance(turn, dict) else turn
            return f"field '{key}[{i}].{role_key}' must be one of {sorted(roles)}, got {got!r:.40}"
        if not isinstance(turn.get(text_key), str):
            return f"field '{key}[{i}].{text_key}' must be a string"
    if not any(t[role_key] in ("assistant", "gpt", "model") for t in turns):
        return f"field '{key}' has no assistant turn to learn from"
    return None


def check_file(path: str, cfg: DataConfig, tokenizer=None, field_name: str = "data.path") -> FileReport:
    """Every row of `path` checked for `cfg.format`; with a tokenizer, too-long rows counted. Raises on errors."""
    resolved = resolve_path(path)
    if resolved is None:
        raise RecipeError(f"field '{field_name}': {path!r} not found")
    report = FileReport(str(resolved))
    rows, problems = read_rows(resolved)
    problems += [f"{where}: {p}" for where, row in rows if (p := row_problem(row, cfg.format))]
    report.rows = len(rows)
    if not problems and not rows:
        problems = ["the file holds no rows"]
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise RecipeError(f"field '{field_name}': {resolved} cannot be used as format '{cfg.format}' "
                          f"({len(problems)} problem(s) in {len(rows)} rows)\n{shown}{more}")
    if tokenizer is not None:
        from workloads.data import tokenize_records

        report.too_long = sum(not tokenize_records([row], cfg, tokenizer) for _, row in rows)
        if report.usable == 0:
            raise RecipeError(f"field 'data.max_length': none of the {report.rows} rows of {resolved} keeps an "
                              f"answer token within max_length={cfg.max_length}: raise it")
    return report


def check_data(cfg: DataConfig, tokenizer=None) -> list[FileReport]:
    """The train file and the eval file, if any; raises `RecipeError` naming what is wrong."""
    reports = [check_file(cfg.path, cfg, tokenizer)]
    if cfg.eval_path:
        reports.append(check_file(cfg.eval_path, cfg, tokenizer, "data.eval_path"))
    return reports


def describe(reports: list[FileReport]) -> str:
    """One line for the terminal: rows per file and what max_length cut away."""
    parts = []
    for r in reports:
        cut = f", {r.too_long} too long for max_length (skipped)" if r.too_long else ""
        parts.append(f"{Path(r.path).name}: {r.rows} rows{cut}")
    return "data " + "; ".join(parts)
