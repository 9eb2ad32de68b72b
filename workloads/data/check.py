"""Read a recipe's data on the driver, before Ray starts, and say exactly what no worker could train on.

A dataset that cannot be read, is empty, or whose rows lack what the format needs (after its column
mapping) is a `RecipeError` (exit 2) naming the recipe field, the file or dataset, the line or row, and
the field, column or value at fault: a handful of examples and a count of the rest. Rows that are only
too long are counted and reported; fatal only if none remain. JSON, JSONL and Parquet files are parsed
here (line numbers); CSV files, save_to_disk directories, data_files and hub datasets are read as
training reads them (`data_sources`), rows numbered from 1.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from workloads.common.paths import resolve_files, resolve_path
from workloads.common.recipe import RecipeError
from workloads.data.recipe import DataConfig, DatasetConfig
from workloads.data.sources import builder_for, map_columns, missing_column, open_saved, read_path, read_source

SHOWN = 5  # problems listed one by one; the rest are counted
_ROLES = {"system", "user", "assistant", "tool"}


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


def read_rows(path: Path, builder: str | None = None,
              limit: int | None = None) -> tuple[list[tuple[str, object]], list[str]]:
    """(where, row) for every row (or the first `limit`) of a JSONL, JSON or Parquet file, and the rows that could
    not be parsed. With `limit`, a JSONL or Parquet file is read only that far."""
    if builder_for(path, builder) == "parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path) if limit is None else \
                next(pq.ParquetFile(path).iter_batches(batch_size=limit), None)
            rows = table.to_pylist() if table is not None else []
            return [(f"row {i + 1}", row) for i, row in enumerate(rows)], []
        except Exception as exc:  # noqa: BLE001 - any reader error is the file's fault here
            return [], [f"not a readable Parquet file ({exc})"]
    with path.open(encoding="utf-8", errors="replace") as handle:
        first = handle.read(4096)
        if path.suffix == ".json" and first.lstrip().startswith("["):  # a JSON list of rows; else JSON lines
            try:
                data = json.loads(first + handle.read())
            except json.JSONDecodeError as exc:
                return [], [f"line {exc.lineno}: not valid JSON ({exc.msg})"]
            return [(f"row {i + 1}", row) for i, row in enumerate(data[:limit])], []
        handle.seek(0)
        rows, broken = [], []
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(rows) + len(broken) >= limit:
                break
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
        calls = turn.get("tool_calls") if fmt == "messages" else None
        if calls is not None:
            problem = _tool_calls_problem(calls, f"{key}[{i}].tool_calls", turn[role_key])
            if problem:
                return problem
        if not isinstance(turn.get(text_key), str) and not (calls and turn.get(text_key) is None):
            return f"field '{key}[{i}].{text_key}' must be a string"
    if fmt == "messages" and row.get("tools") is not None:
        tools = row["tools"]
        if not isinstance(tools, list) or not all(isinstance(t, dict) and _function(t).get("name") for t in tools):
            return "field 'tools' must be a list of tool definitions, each with a function name"
    if not any(t[role_key] in ("assistant", "gpt", "model") for t in turns):
        return f"field '{key}' has no assistant turn to learn from"
    return None


def _function(item: dict) -> dict:
    """The function part of an OpenAI tool or tool call ({"type": "function", "function": {...}}) or the item."""
    function = item.get("function", item)
    return function if isinstance(function, dict) else {}


def _tool_calls_problem(calls: object, where: str, role: str) -> str | None:
    if role != "assistant":
        return f"field '{where}': only assistant turns make tool calls, this one is {role!r}"
    if not isinstance(calls, list):
        return f"field '{where}' must be a list of tool calls"
    for j, call in enumerate(calls):
        function = _function(call) if isinstance(call, dict) else {}
        if not isinstance(function.get("name"), str) or not function["name"]:
            return f"field '{where}[{j}].function.name' must be a non-empty string"
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return f"field '{where}[{j}].function.arguments' is not valid JSON: {function['arguments']!r:.60}"
        if not isinstance(arguments, dict):
            return f"field '{where}[{j}].function.arguments' must be a JSON object (or its JSON text)"
    return None


def check_file(path: str, cfg: DataConfig, tokenizer=None, field_name: str = "data.path") -> FileReport:
    """Every row of `path`, read as the recipe's first dataset (builder, columns, format), checked. Raises on errors."""
    _, source = cfg.sources()[0]
    label, rows, problems = _path_rows(path, source.builder, source.split, field_name)
    return _check_rows(rows, problems, field_name, label, source, cfg, tokenizer)


def check_source(source: DatasetConfig, cfg: DataConfig, tokenizer=None, prefix: str = "data",
                 eval_file: bool = False) -> FileReport:
    """Every row of one dataset (or of its eval file) checked for its format after its column mapping; with a
    tokenizer, too-long rows counted. Raises `RecipeError` naming the field (`prefix`.path, .hub, ...) on errors."""
    if eval_file or source.path is not None:
        path, field = (source.eval_path, f"{prefix}.eval_path") if eval_file else (source.path, f"{prefix}.path")
        label, rows, problems = _path_rows(path, source.builder, source.split, field)
    else:
        field, label = ((f"{prefix}.hub", f"{source.hub}:{source.split}") if source.hub
                        else (f"{prefix}.data_files", ", ".join(source.data_files or [])))
        rows, problems = _numbered(read_source(source, prefix)), []
    return _check_rows(rows, problems, field, label, source, cfg, tokenizer)


def check_data(cfg: DataConfig, tokenizer=None) -> list[FileReport]:
    """Every dataset of the recipe and its eval file, if any; raises `RecipeError` naming what is wrong."""
    reports = []
    for prefix, source in cfg.sources():
        reports.append(check_source(source, cfg, tokenizer, prefix))
        if source.eval_path:
            reports.append(check_source(source, cfg, tokenizer, prefix, eval_file=True))
    return reports


def check_heads(cfg: DataConfig, tokenizer=None) -> list[FileReport]:
    """`check_data` on the first `data.streaming.check_rows` rows of every dataset (its first file) and eval file:
    the streaming path's check before Ray starts, so a broken file is refused in seconds without reading it all."""
    limit, reports = cfg.streaming.check_rows, []
    for prefix, source in cfg.sources():
        for eval_file in (False, True) if source.eval_path else (False,):
            if eval_file or source.path is not None:
                field = f"{prefix}.eval_path" if eval_file else f"{prefix}.path"
                label, rows, problems = _path_rows(source.eval_path if eval_file else source.path, source.builder,
                                                   source.split, field, limit)
            elif source.data_files is not None:
                field = f"{prefix}.data_files"
                first = next(p for pattern in source.data_files for p in resolve_files(pattern))
                label, rows, problems = _path_rows(str(first), source.builder, "train", field, limit)
            else:
                from workloads.data.sources import open_hub

                field, label = f"{prefix}.hub", f"{source.hub}:{source.split}"
                rows, problems = _numbered(islice(open_hub(source.hub, source.subset, source.split, prefix,
                                                           streaming=True), limit)), []
            reports.append(_check_rows(rows, problems, field, label, source, cfg, tokenizer))
    return reports


def _path_rows(path: str, builder: str | None, split: str, field: str,
               limit: int | None = None) -> tuple[str, list, list[str]]:
    """(label, numbered rows, unparsable rows) of a file or save_to_disk directory (its first `limit` rows)."""
    resolved = resolve_path(path)
    if resolved is None:
        raise RecipeError(f"field '{field}': {path!r} not found")
    if resolved.is_file() and builder_for(resolved, builder) != "csv":
        return str(resolved), *read_rows(resolved, builder, limit)
    if limit is None:
        return str(resolved), _numbered(read_path(path, builder, split, field)), []
    if resolved.is_dir():
        saved = open_saved(resolved, split, field)
        return str(resolved), _numbered(saved.select(range(min(limit, len(saved))))), []
    return str(resolved), _numbered(_csv_head(resolved, limit)), []


def _csv_head(path: Path, limit: int) -> list[dict]:
    """The first `limit` rows of a CSV file, every value as text (as `data_sources` reads a CSV)."""
    with path.open(newline="", encoding="utf-8") as handle:
        return list(islice(csv.DictReader(handle), limit))


def _numbered(rows: list[dict]) -> list[tuple[str, object]]:
    return [(f"row {i}", row) for i, row in enumerate(rows, start=1)]


def _check_rows(rows: list[tuple[str, object]], problems: list[str], field: str, label: str, source: DatasetConfig,
                cfg: DataConfig, tokenizer) -> FileReport:
    fmt, columns = source.format, source.columns
    mapped = []
    for where, row in rows:
        if columns and isinstance(row, dict) and (problem := missing_column(row, columns)):
            problems.append(f"{where}: {problem}")
            continue
        row = map_columns(row, columns) if isinstance(row, dict) else row
        if problem := row_problem(row, fmt):
            problems.append(f"{where}: {problem}")
        mapped.append(row)
    report = FileReport(label, rows=len(rows))
    if not problems and not rows:
        problems = ["the dataset holds no rows"]
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise RecipeError(f"field '{field}': {label} cannot be used as format '{fmt}' "
                          f"({len(problems)} problem(s) in {len(rows)} rows)\n{shown}{more}")
    if tokenizer is not None:
        from workloads.data.formats import tokenize_records

        report.too_long = sum(not tokenize_records([row], cfg, tokenizer, fmt) for row in mapped)
        if report.usable == 0:
            raise RecipeError(f"field 'data.max_length': none of the {report.rows} rows of {label} keeps an "
                              f"answer token within max_length={cfg.max_length}: raise it")
    return report


def describe(reports: list[FileReport]) -> str:
    """One line for the terminal: rows per file and what max_length cut away."""
    parts = []
    for r in reports:
        cut = f", {r.too_long} too long for max_length (skipped)" if r.too_long else ""
        parts.append(f"{Path(r.path).name}: {r.rows} rows{cut}")
    return "data " + "; ".join(parts)
