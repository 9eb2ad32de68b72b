"""What a running cluster is doing, for `llmc status`: jobs, train runs, serve apps and their endpoint.

Everything is read over HTTP, as the dashboard reads it: the job API (with the cluster token), the
dashboard's Train and Serve APIs, and each node's Prometheus export (found through the dashboard's
service discovery) for the `llmc_train_*` gauges a train loop publishes. So it works the same for a
run driven by a submitted job or by an embedded driver, and `llmc status` itself starts no driver.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from ray.job_submission import JobSubmissionClient

from cluster.jobs import auth_headers, dashboard_address
from cluster.metrics import RUN_TAG, TRAIN_GAUGES, TRAIN_METRIC_PREFIX, exported_name, scrape

_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


class ClusterUnreachable(RuntimeError):
    """No dashboard answers at the address, or it refused the token."""


def collect(address: str | None = None, timeout_s: float = 10) -> dict:
    """A snapshot of the cluster at `address` (dashboard URL; default RAY_ADDRESS or :8265) as plain data."""
    url = dashboard_address(address)
    get = _Dashboard(url, timeout_s)
    get("/api/version")  # fails fast, with a clear message, when nothing answers
    serve_details = get("/api/serve/applications/", missing={})
    return {
        "dashboard": url,
        "jobs": _jobs(url),
        "train_runs": _train_runs(get, timeout_s),
        "serve": _serve_apps(serve_details, url),
    }


class _Dashboard:
    """GET a dashboard REST path as JSON, with the cluster token."""

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s, self.headers = url, timeout_s, auth_headers()

    def __call__(self, path: str, missing=None):
        request = urllib.request.Request(self.url + path, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:  # noqa: S310 - the dashboard
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ClusterUnreachable(f"the Ray dashboard at {self.url} refused the auth token ({exc.code}): "
                                         "set RAY_AUTH_TOKEN or ~/.ray/auth_token to the cluster's token") from None
            if missing is not None:  # e.g. Train state not enabled, Serve not started
                return missing
            raise
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClusterUnreachable(f"no Ray cluster answers at {self.url} ({reason}): start one "
                                     "(`ray up cluster.yaml`, `ray start --head`) or pass --address URL") from None


def _jobs(url: str) -> list[dict]:
    client = JobSubmissionClient(url, headers=auth_headers())
    rows = []
    for job in client.list_jobs():
        rows.append({
            "id": job.submission_id or job.job_id,
            "type": str(getattr(job.type, "value", job.type)),
            "status": str(getattr(job.status, "value", job.status)),
            "entrypoint": job.entrypoint,
            "start_time": _seconds(job.start_time, 1e3),
            "end_time": _seconds(job.end_time, 1e3),
            "message": job.message,
        })
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def _train_runs(get: _Dashboard, timeout_s: float) -> list[dict]:
    """Ray Train V2's runs (name, status, job) with the newest `llmc_train_*` values of each run name."""
    state = get("/api/train/v2/runs/v1", missing={}) or {}
    runs = [{
        "name": run["name"],
        "status": run.get("status"),
        "job_id": run.get("job_id"),
        "start_time": _seconds(run.get("start_time_ns"), 1e9),
        "end_time": _seconds(run.get("end_time_ns"), 1e9),
        "attempts": len(run.get("attempts") or []),
    } for run in state.get("train_runs", [])]
    values = _train_metrics(get, timeout_s)
    seen: set[str] = set()
    for run in sorted(runs, key=lambda r: r["start_time"] or 0, reverse=True):
        # Gauges carry the run name only: they belong to the newest run of that name.
        run.update(values.get(run["name"], {}) if run["name"] not in seen else {})
        seen.add(run["name"])
    # Runs seen only through their metrics (a cluster whose drivers did not enable Train state tracking).
    runs += [{"name": name, "status": None, **vals} for name, vals in values.items() if name not in seen]
    return sorted(runs, key=lambda r: r.get("start_time") or 0, reverse=True)


def _train_metrics(get: _Dashboard, timeout_s: float) -> dict[str, dict[str, float]]:
    """{run name: {step, loss, ...}} from every node's export; per run, the process that reached the highest step."""
    targets = [t for group in get("/api/prometheus/sd", missing=[]) or [] for t in group.get("targets", [])]
    wanted = {exported_name(TRAIN_METRIC_PREFIX + key): key for key in TRAIN_GAUGES}
    by_process: dict[tuple[str, str], dict[str, float]] = {}
    for target in targets:
        try:
            samples = scrape(f"http://{target}/metrics", timeout_s=min(timeout_s, 3))
        except OSError:
            continue  # a node this machine cannot reach: its runs show without values
        for name, labels, value in samples:
            if name in wanted and RUN_TAG in labels:
                key = (labels[RUN_TAG], labels.get("WorkerId", target))
                by_process.setdefault(key, {})[wanted[name]] = value
    best: dict[str, dict[str, float]] = {}
    for (run, _), vals in by_process.items():
        if vals.get("step", -1) >= best.get(run, {}).get("step", -1):
            best[run] = vals
    return best


def _serve_apps(details: dict, dashboard: str) -> list[dict]:
    """Serve applications with each deployment's replicas and autoscaling targets, and the app's URL."""
    http = details.get("http_options") or {}
    host = http.get("host", "")
    host = urlparse(dashboard).hostname if host in _WILDCARD_HOSTS else host
    apps = []
    for name, app in (details.get("applications") or {}).items():
        deployments = []
        for dep_name, dep in (app.get("deployments") or {}).items():
            config = dep.get("deployment_config") or {}
            scaling = config.get("autoscaling_config") or {}
            replicas = dep.get("replicas") or []
            deployments.append({
                "name": dep_name,
                "status": dep.get("status"),
                "running_replicas": sum(r.get("state") == "RUNNING" for r in replicas),
                "replicas": len(replicas),
                "target_replicas": dep.get("target_num_replicas"),
                "min_replicas": scaling.get("min_replicas"),
                "max_replicas": scaling.get("max_replicas"),
                "target_ongoing_requests": scaling.get("target_ongoing_requests"),
            })
        prefix = app.get("route_prefix")
        apps.append({
            "name": name,
            "status": app.get("status"),
            "url": f"http://{host}:{http['port']}{prefix}" if prefix is not None and http.get("port") else None,
            "deployments": deployments,
        })
    return apps


def _seconds(value, per_second: float) -> float | None:
    return value / per_second if value else None


# ---------------------------------------------------------------------------------------------
# For a person: rich tables
# ---------------------------------------------------------------------------------------------


def render(status: dict) -> None:
    """Print the snapshot as the dashboard would show it: jobs, train runs, serve apps."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough that ids and numbers never wrap
        console = Console(width=160)
    console.print(f"Ray cluster: dashboard [bold]{status['dashboard']}[/]")

    jobs = Table(title="Jobs", title_justify="left")
    for column in ("id", "type", "status", "started"):
        jobs.add_column(column, no_wrap=True)
    jobs.add_column("entrypoint", no_wrap=True, overflow="ellipsis")
    for job in status["jobs"]:
        jobs.add_row(job["id"], job["type"], job["status"], _clock(job["start_time"]),
                     _short(job["entrypoint"] or "", 70))
    console.print(jobs if status["jobs"] else "Jobs: none")

    runs = Table(title="Train runs", title_justify="left")
    for column in ("run", "status", "step", "loss", "eval loss", "lr", "tokens/s", "restarts", "started"):
        runs.add_column(column, justify="right" if column not in ("run", "status") else "left", no_wrap=True)
    for run in status["train_runs"]:
        runs.add_row(run["name"], run.get("status") or "-", _num(run.get("step"), "{:.0f}"), _num(run.get("loss")),
                     _num(run.get("eval_loss")), _num(run.get("lr"), "{:.2e}"),
                     _num(run.get("tokens_per_second"), "{:.0f}"), _num(run.get("restarts"), "{:.0f}"),
                     _clock(run.get("start_time")))
    console.print(runs if status["train_runs"] else "Train runs: none")

    if not status["serve"]:
        console.print("Serve applications: none")
    for app in status["serve"]:
        table = Table(title=f"Serve app {app['name']}: {app['status']}  {app['url'] or ''}", title_justify="left")
        for column in ("deployment", "status", "replicas (running/target)", "min-max", "target ongoing requests"):
            table.add_column(column, no_wrap=True)
        for dep in app["deployments"]:
            bounds = f"{dep['min_replicas']}-{dep['max_replicas']}" if dep["max_replicas"] is not None else "fixed"
            table.add_row(dep["name"], str(dep["status"]), f"{dep['running_replicas']}/{dep['target_replicas']}",
                          bounds, _num(dep["target_ongoing_requests"], "{:g}"))
        console.print(table)


def _num(value, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def _clock(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
