"""Connect to Ray: embedded local Ray by default, a running cluster with an address or RAY_ADDRESS."""

from __future__ import annotations

import os

import ray

# Serve runs an ingress and one engine per replica beside training workers; on a 2-core laptop the
# logical CPU count is what lets them share the machine (DESIGN.md: ray.init(num_cpus=8)).
DEFAULT_LOCAL_CPUS = 8
DEFAULT_OBJECT_STORE_BYTES = 1 << 30


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Initialize Ray once per process and return a one-line description of where it runs."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(
                num_cpus=num_cpus or max(os.cpu_count() or 1, DEFAULT_LOCAL_CPUS),
                object_store_memory=DEFAULT_OBJECT_STORE_BYTES,
                log_to_driver=True,
            )
    ctx = ray.get_runtime_context()
    dashboard = ray._private.worker.get_dashboard_url() or ""
    where = f"Ray cluster at {address}" if address else "embedded local Ray"
    resources = ray.cluster_resources()
    return (
        f"{where} (node {ctx.get_node_id()[:8]}, {resources.get('CPU', 0):g} CPUs, "
        f"{resources.get('GPU', 0):g} GPUs{', dashboard http://' + dashboard if dashboard else ''})"
    )


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
