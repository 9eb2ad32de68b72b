"""What a run on one machine relies on without saying so, refused on a cluster whose nodes are other machines.

On one machine every worker shares the driver's loopback and files: an S3 endpoint on 127.0.0.1, checkpoints
under the run directory and a model built into the local cache just work. On a cluster with nodes at other IPs
they do not, and the failure would come late and vague (a connection refused inside a replica, a checkpoint
shard written to another machine's disk, a model "not found" in every restarted worker). So the driver checks,
right after it connects and before any work, and names each recipe field to change: by the nodes' IPs for
loopback endpoints, and for local paths by a look from every other machine (`cluster.runtime`).
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from workloads.common.recipe import RecipeError

if TYPE_CHECKING:
    from workloads.serve.recipe import AdaptersConfig

# The variables boto3 and pyarrow (Ray Train's storage) read for an S3 endpoint, the more specific first.
S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_MODEL_REMEDY = ("name a model every node reaches (a hub id) or a directory every node mounts at that path; the "
                 "tiny model is built into $LLMC_CACHE, which can be such a mount")
_READ_REMEDY = "put it in a directory every node mounts at the same path"
_DIR_REMEDY = ("point it (the run directory: --output-dir, or run.output_dir) at a directory every node mounts at "
               "the same path")


def is_loopback(host: str | None) -> bool:
    """Whether `host` (a name or an IP) means this machine only: localhost, 127.0.0.0/8, ::1."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_adapter_store(adapters: AdaptersConfig) -> str | None:
    """How the adapter store sits on this machine's loopback (for a message), or None if it does not."""
    if not adapters.enabled:
        return None
    if adapters.endpoint_url == "local":
        return "'local' runs the adapter store on this machine's loopback (127.0.0.1)"
    if adapters.endpoint_url and is_loopback(urlparse(adapters.endpoint_url).hostname):
        return f"{adapters.endpoint_url} is this machine's loopback"
    return None


def check_training(storage_path: str | None, storage: str, model_path: str, reads: Mapping[str, str] | None = None,
                   shared_dirs: Mapping[str, str] | None = None) -> None:
    """Before a Ray Train run: every node must share its checkpoint storage and reach its base model, and whatever
    else its workers read (`reads`: recipe field -> a local file or directory, such as a start adapter or a reward
    model) or read and write beside the driver (`shared_dirs`: field -> directory, such as the RL run directory the
    engines load synced weights from).

    An unset `run.storage_path` (the run directory on this machine) is refused; an `s3://` one when this process
    reaches S3 through a loopback endpoint (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL); a local one, and each
    `shared_dirs` directory, unless every node sees a marker file written there (a shared mount), as Ray Train
    itself checks only at a worker's first checkpoint. Every problem found is named at once.
    """
    others = _other_machines()
    if not others:
        return
    nodes, problems = ", ".join(others), []
    if storage_path is None:
        problems.append(f"field 'run.storage_path': not set, so checkpoints go to {storage} on this machine, which "
                        f"the workers on the cluster's nodes at {nodes} cannot share: set run.storage_path to an "
                        "s3:// URI (or a directory every node mounts at the same path)")
    elif storage_path.startswith("s3://"):
        var = next((v for v in S3_ENDPOINT_VARS if os.environ.get(v)), None)
        url = os.environ.get(var, "") if var else ""
        if is_loopback(urlparse(url).hostname):
            problems.append(f"field 'run.storage_path': {storage_path} is reached through ${var}={url}, this "
                            f"machine's loopback, which the workers on the cluster's nodes at {nodes} cannot reach: "
                            f"set {var} (here and on every node) to an S3 endpoint every node reaches")
    paths = {"model.name": (model_path, _MODEL_REMEDY)} if Path(model_path).is_dir() else {}
    paths |= {field: (path, _READ_REMEDY) for field, path in (reads or {}).items() if Path(path).exists()}
    dirs = {field: (path, _DIR_REMEDY) for field, path in (shared_dirs or {}).items()}
    if storage_path is not None and "://" not in storage_path:
        dirs["run.storage_path"] = (storage_path, "set run.storage_path to an s3:// URI or a directory every node "
                                                  "mounts at the same path")
    markers = {field: Path(path) / f".llmc-shared-{uuid.uuid4().hex[:12]}" for field, (path, _) in dirs.items()}
    try:
        for field, marker in markers.items():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            paths[field] = (str(marker), dirs[field][1])
        problems += _not_shared(paths, markers=set(markers))
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
    if problems:
        raise RecipeError("\n".join(problems))


def check_serving(adapters: AdaptersConfig, model_source: str) -> None:
    """Before deploying: replicas may start on any node, so each must reach the adapter store and the model."""
    others = _other_machines()
    if not others:
        return
    problems = []
    where = loopback_adapter_store(adapters)
    if where:
        problems.append(f"field 'adapters.endpoint_url': {where}, which replicas on the cluster's nodes at "
                        f"{', '.join(others)} cannot reach: set adapters.endpoint_url to an S3 endpoint every node "
                        "reaches (null for AWS S3) and adapters.store_uri to a bucket there")
    if Path(model_source).is_dir():
        problems += _not_shared({"model.name": (model_source, _MODEL_REMEDY)}, markers=set())
    if problems:
        raise RecipeError("\n".join(problems))


def _other_machines() -> list[str]:
    """IPs of the connected cluster's alive nodes other than the driver's own (empty on one machine)."""
    from cluster.runtime import node_ips

    here, ips = node_ips()
    return [ip for ip in ips if ip != here]


def _not_shared(paths: dict[str, tuple[str, str]], markers: set[str]) -> list[str]:
    """A problem for each field whose local path (field -> (path, remedy)) some other machine does not see; for the
    fields in `markers` the path is a marker file, named by its directory."""
    if not paths:
        return []
    from cluster.runtime import missing_on_other_machines

    missing = missing_on_other_machines([path for path, _ in paths.values()])
    problems = []
    for field, (path, remedy) in paths.items():
        nodes = [ip for ip, lacking in missing.items() if path in lacking]
        if nodes:
            shown = Path(path).parent if field in markers else path
            problems.append(f"field '{field}': {shown} is on this machine but not on the cluster's nodes at "
                            f"{', '.join(nodes)}, whose workers would read or write it there: {remedy}")
    return problems
