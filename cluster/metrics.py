"""Application metrics on Ray's metrics pipeline (`ray.util.metrics`), and reading them back.

Ray exports every metric set in any process of a node on that node's Prometheus endpoint
(`--metrics-export-port`), prefixed `ray_`; a counter gets the suffix `_total`. So a gauge named
`llmc_train_loss` here is scraped as `ray_llmc_train_loss`, a counter `llmc_serve_requests` as
`ray_llmc_serve_requests_total`. Values reach the export on Ray's export interval (about 10 s).
The dashboard and Grafana read these series; `llmc status` reads them too (`scrape`). The names
this project exports are listed here (`TRAIN_GAUGES`, `SERVE_COUNTERS`), so the Grafana dashboard in
`monitoring/` can be checked against them.
"""

from __future__ import annotations

import math
import re
import urllib.request
from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge

EXPORT_PREFIX = "ray_"
RUN_TAG = "run"
# What a train loop publishes per step (`cluster.train.publish`): gauges `llmc_train_<key>{run=NAME}`.
TRAIN_METRIC_PREFIX = "llmc_train_"
TRAIN_GAUGES = {
    "step": "optimizer steps done",
    "loss": "training loss of the step (mean over workers)",
    "eval_loss": "loss on the eval set at the last evaluation",
    "lr": "learning rate",
    "grad_norm": "gradient norm before clipping",
    "tokens_per_second": "tokens trained per second in the step (all workers)",
    "restarts": "worker-group restarts after failures so far",
}
# What the serving ingress counts (`cluster.serve`): counters, exported as `ray_<name>_total`.
SERVE_COUNTERS = {
    "llmc_serve_requests": "requests answered by the ingress, by route and status code",
    "llmc_serve_cache_hits": "deterministic requests answered from the response cache",
    "llmc_serve_cache_misses": "deterministic requests not in the response cache",
    "llmc_serve_unauthorized": "requests refused with 401 (missing or invalid API key)",
    "llmc_serve_client_errors": "4xx answers, by reason",
    "llmc_serve_shed": "requests shed with 503 (the engine deployment's backpressure)",
}
_gauges: dict[tuple[str, tuple[str, ...]], Gauge] = {}
_counters: dict[tuple[str, tuple[str, ...]], Counter] = {}


def exported_name(name: str, kind: str = "gauge") -> str:
    """The series name Ray's Prometheus export gives a metric `name` of `kind` (gauge or counter)."""
    return f"{EXPORT_PREFIX}{name}{'_total' if kind == 'counter' else ''}"


def set_gauge(name: str, value: float, tags: Mapping[str, str], description: str = "") -> None:
    """Set gauge `name` (created on first use in this process, with `tags`' keys) to `value`."""
    key = (name, tuple(sorted(tags)))
    gauge = _gauges.get(key)
    if gauge is None:
        gauge = _gauges[key] = Gauge(name, description=description or name, tag_keys=key[1])
    gauge.set(float(value), tags=dict(tags))


def inc_counter(name: str, tags: Mapping[str, str], value: float = 1.0, description: str = "") -> None:
    """Add `value` to counter `name` (created on first use in this process, with `tags`' keys)."""
    key = (name, tuple(sorted(tags)))
    counter = _counters.get(key)
    if counter is None:
        counter = _counters[key] = Counter(name, description=description or name, tag_keys=key[1])
    counter.inc(value, tags=dict(tags))


# ---------------------------------------------------------------------------------------------
# Reading an export back (tests, `llmc status`)
# ---------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isnan(number):
            continue
        parsed = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(labels or "")}
        samples.append((name, parsed, number))
    return samples


def scrape(url: str, timeout_s: float = 10) -> list[tuple[str, dict[str, str], float]]:
    """Fetch and parse one node's Prometheus export (`http://HOST:PORT/metrics`)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - a node's metrics port
        return parse_exposition(resp.read().decode("utf-8", "replace"))


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples of series `name` whose labels include `labels` (over processes and other labels)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))
