"""MLflow as the system of record: every `llmc` command that produces results leaves one MLflow run.

The run holds the resolved recipe as params (dotted keys), the summary's numbers and the rows of the results table
(each CSV at the top of the output directory, keyed by its first column: steps or iterations as a series, variants,
candidates or trials by name) as metrics, the output files as artifacts (weights and Ray storage only by path), and
lineage tags: recipe hash, data digest, base model and its digest, git commit. Opened before the command's work, so a
store that cannot be used fails first and a command that fails leaves a FAILED run.

Store: `MLFLOW_TRACKING_URI` (a tracking server with its own database and artifact store), else an SQLite database
beside the run directories, `sqlite:///<runs dir>/mlflow.db` with artifacts in `<runs dir>/mlartifacts` (the runs
dir is the output directory's parent: `runs/` for the default layout). `LLMC_MLFLOW=off` records nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import fcntl
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from workloads.common import tracking
from workloads.common.paths import REPO_ROOT, resolve_files

SWITCH_ENV = "LLMC_MLFLOW"  # "off": no run is recorded
EXPERIMENT = "llmc"  # the experiment of recipes without a tracking block (others: tracking.experiment)
# Output entries recorded by path only: weights (full or merged models) and Ray Train/Tune storage.
BY_PATH = ("model", "merged", "checkpoints", "tune", "trials", "tracking")
TAG = "llmc."  # prefix of this project's tags
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")  # what MLflow refuses in a metric name

_CURRENT: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("llmc_recording", default=None)


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store named (or the default one) cannot be opened."""


def enabled() -> bool:
    """Whether commands record their runs (`LLMC_MLFLOW=off` turns it off)."""
    return os.environ.get(SWITCH_ENV, "").strip().lower() not in ("off", "0", "false", "no")


def tracking_uri(runs_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else the SQLite database `<runs_dir>/mlflow.db`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def artifact_location(runs_dir: Path) -> str | None:
    """Where a new experiment of the default store keeps artifacts; None: the tracking server decides."""
    return None if os.environ.get("MLFLOW_TRACKING_URI") else (Path(runs_dir).resolve() / "mlartifacts").as_uri()


def check_store(uri: str) -> None:
    """Raise TrackingStoreError, naming the URI and where it came from, when the store cannot be used; a new
    SQLite database is created here (under a lock: concurrent first commands create it once)."""
    origin = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else "the default store"
    try:
        if uri.startswith(("http://", "https://")):  # a server: one quick probe, not MLflow's minutes of retries
            import requests

            requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
            return
        with _store_lock(uri):
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure to open the store is this one error, with its cause
        raise TrackingStoreError(f"MLflow tracking store {uri!r} ({origin}) cannot be used: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                                 f"(set MLFLOW_TRACKING_URI to a reachable server or store, or {SWITCH_ENV}=off)"
                                 ) from exc


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(f".{database.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@dataclass
class Recording:
    """The MLflow run of one command, open while it works."""

    run: tracking.MLflowRun
    uri: str
    out: Path
    recipe: BaseModel
    experiment: str
    nested: list[Path] = field(default_factory=list)  # output dirs of the runs opened under this one (its stages)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def finish(self, summary: dict) -> None:
        """Log what the command left in its output directory: metrics, artifacts, the base model's digest."""
        client = self.run.client
        numbers = {_metric_name(k): float(v) for k, v in summary.items() if _is_number(v)}
        if numbers:
            self.run.log_metrics(numbers, step=0)
        for table in sorted(self.out.glob("*.csv")):
            self._log_table(table)
        for entry in sorted(self.out.iterdir()):
            if entry.name in BY_PATH or entry.resolve() in self.nested:  # a nested run logged that one itself
                client.set_tag(self.run_id, f"{TAG}path.{entry.name}", str(entry.resolve()))
            elif entry.is_dir():
                client.log_artifacts(self.run_id, str(entry), artifact_path=entry.name)
            elif entry.is_file():
                client.log_artifact(self.run_id, str(entry))
        if model_path := summary.get("base_model_path") or _base_model_path(self.recipe):
            client.set_tag(self.run_id, f"{TAG}base_model_digest", model_digest(model_path))

    def _log_table(self, path: Path) -> None:
        """A results table: rows keyed by a number (step, iteration) as a series, rows keyed by name as
        `<name>/<column>`."""
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            return
        key = next(iter(rows[0]))
        for row in rows:
            values = {column: n for column, v in row.items() if column != key and _is_number(n := _number(v))}
            if _is_number(step := _number(row[key])):
                self.run.log_metrics({tracking.metric_name(c): v for c, v in values.items()}, step=int(step))
            else:
                self.run.log_metrics({_metric_name(f"{row[key]}/{c}"): v for c, v in values.items()}, step=0)


def current() -> Recording | None:
    """The run of the command now working, if one is recorded (for code that registers what it writes)."""
    return _CURRENT.get()


@contextlib.contextmanager
def recording(kind: str, recipe: BaseModel, out: Path) -> Iterator[Recording | None]:
    """The MLflow run of a command of `kind` writing to `out`, open for the `with` block (None when recording is
    off): params and lineage tags now, FINISHED or FAILED at the end. Opened while another command's run is open (a
    pipeline's stage), it is a nested run of that one (MLflow's `mlflow.parentRunId` tag, what
    `mlflow.start_run(nested=True)` sets), in its store and experiment."""
    if not enabled():
        yield None
        return
    out = Path(out).resolve()
    if (parent := current()) is not None:
        uri, experiment = parent.uri, parent.experiment
    else:
        uri = tracking_uri(out.parent)
        check_store(uri)
        tracker = getattr(recipe, "tracking", None)
        experiment = tracker.experiment if tracker else EXPERIMENT
    tags = lineage_tags(kind, resolved := resolved_recipe(recipe), out)
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.run_id
        parent.nested.append(out)
    run = tracking.MLflowRun(uri, experiment, out.name, artifact_location=artifact_location(out.parent), tags=tags)
    run.log_params(tracking.flatten(resolved))
    rec = Recording(run, uri, out, recipe, experiment)
    token = _CURRENT.set(rec)
    failed = True
    try:
        yield rec
        failed = False
    finally:
        _CURRENT.reset(token)
        run.close(failed)


def resolved_recipe(recipe: BaseModel) -> dict:
    """The recipe as it runs, every default filled in; a search's fine-tuning recipe under `base`."""
    resolved = recipe.model_dump(mode="json")
    if callable(base := getattr(recipe, "base", None)):
        resolved["base"] = base().model_dump(mode="json")
    return resolved


def lineage_tags(kind: str, resolved: dict, out: Path) -> dict[str, str]:
    """What a run of the `resolved` recipe came from: kind, output directory, recipe hash, data digest, base model,
    git commit."""
    tags = {f"{TAG}kind": kind, f"{TAG}output_dir": str(out),
            f"{TAG}recipe_hash": hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest(),
            f"{TAG}data_digest": data_digest(resolved)}
    if model := (resolved.get("base") or resolved).get("model"):
        tags[f"{TAG}base_model"] = model if isinstance(model, str) else model["name"]
    elif endpoint := resolved.get("endpoint"):
        tags[f"{TAG}base_model"] = f"{endpoint['model']} at {endpoint['base_url'] or endpoint['serve']}"
    if commit := git_commit():
        tags[f"{TAG}git_commit"] = tags["mlflow.source.git.commit"] = commit
    return tags


def data_digest(resolved: dict) -> str:
    """SHA-256 over every data file the recipe reads (its `path`, `eval_path` and `data_files` fields, found at any
    depth) and every hub dataset it names, each with the digest of its content."""
    digest = hashlib.sha256()
    for source in sorted(set(_data_sources(resolved))):
        files = resolve_files(source) if not source.startswith("hub:") else []
        digest.update(f"{source}\n".encode())
        for path in files:
            digest.update(f"{_files_digest(path)}\n".encode())
    return digest.hexdigest()


def _data_sources(node) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("path", "eval_path") and isinstance(value, str):
                yield value
            elif key == "data_files" and isinstance(value, list):
                yield from (v for v in value if isinstance(v, str))
            elif key == "hub" and isinstance(value, str):
                yield f"hub:{value}@{node.get('subset')}/{node.get('split')}"
            else:
                yield from _data_sources(value)
    elif isinstance(node, list):
        for item in node:
            yield from _data_sources(item)


def model_digest(path: str) -> str:
    """SHA-256 over a model directory's files (names and contents); a hub id that is no local directory: `hub:ID`."""
    return _files_digest(Path(path)) if Path(path).exists() else f"hub:{path}"


def _files_digest(path: Path) -> str:
    """A file's SHA-256, or one over a directory's files (relative names and their digests)."""
    from workloads.models.cache import file_sha256

    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()} {file_sha256(item)}\n".encode())
    return digest.hexdigest()


def _base_model_path(recipe: BaseModel) -> str | None:
    """The base model's directory (or hub id): the recipe's model (a search's fine-tuning recipe's), or that of
    the server a prompt-engineering recipe starts for its run; None for an external endpoint."""
    from workloads.kinds import load_recipe
    from workloads.models.loading import resolve_model_path  # torch: imported only when the digest is asked for

    base = recipe.base() if callable(getattr(recipe, "base", None)) else recipe
    if (model := getattr(base, "model", None)) is not None and not isinstance(model, str):
        return resolve_model_path(model)
    endpoint = getattr(recipe, "endpoint", None)
    if endpoint is None or endpoint.base_url is not None:
        return None
    return resolve_model_path(load_recipe(endpoint.serve, kind="serve").model)


def git_commit() -> str | None:
    """The repository's commit, if this code runs from a git checkout (a job's uploaded working dir is none)."""
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _metric_name(name: str) -> str:
    return _METRIC_NAME.sub("_", name)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # NaN is no score
