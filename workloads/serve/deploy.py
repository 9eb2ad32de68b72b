"""`llmc serve RECIPE [--port P]`: an OpenAI-compatible endpoint for a model and its LoRA adapters.

The driver checks everything it can before touching Ray (recipe, keys, adapters), and once connected that
the cluster's nodes reach the adapter store (`workloads.common.multinode`); it uploads the adapters to the recipe's
object store (starting a local S3 endpoint on 127.0.0.1 when the store is the default local one), deploys
through `cluster.serve`, prints the URL and serves until Ctrl-C or SIGTERM, then deletes the app. API keys
stay in this process: the cluster only receives their hashes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from workloads.common.multinode import check_serving, is_loopback, loopback_adapter_store
from workloads.common.paths import REPO_ROOT, resolve_path
from workloads.common.recipe import RecipeError
from workloads.models.recipe import adapter_rank
from workloads.serve.objectstore import LocalS3, S3Endpoint, ensure_prefix, free_port, upload_adapter
from workloads.serve.plan import (
    SERVE_INGRESS_CPUS,
    serve_bundle_per_worker,
    serve_deployment_config,
    serve_engine_env,
    serve_engine_kwargs,
    serve_frontend_kwargs,
)
from workloads.serve.recipe import LOOPBACK_HOSTS, ServeRecipe

READY_LINE = "[llmc] ready:"  # `llmc serve` prints this, then the URL, once it answers


MIN_KEY_LENGTH = 32  # only hashes reach the cluster: a long random key cannot be found from its SHA-256


def api_keys(recipe: ServeRecipe) -> list[str]:
    """Accepted keys: the recipe's plus the comma-separated ones in `server.api_key_env`, which is then removed
    from this process's environment (an embedded Ray's raylet and workers inherit it)."""
    keys = [k.get_secret_value() for k in recipe.server.api_keys]
    if recipe.server.api_key_env:
        keys += [k.strip() for k in os.environ.pop(recipe.server.api_key_env, "").split(",") if k.strip()]
    return keys


def check_before_start(recipe: ServeRecipe, keys: list[str], address: str | None = None) -> dict[str, Path]:
    """Refuse what cannot or must not run, before any Ray work; returns the adapter dirs by name."""
    s = recipe.server
    short = [len(k) for k in keys if len(k) < MIN_KEY_LENGTH]
    if short:
        where = f"server.api_keys or ${s.api_key_env}" if s.api_key_env else "server.api_keys"
        raise RecipeError(f"field 'server.api_keys': {len(short)} key(s) in {where} shorter than {MIN_KEY_LENGTH} "
                          f"characters ({', '.join(map(str, short))}): use long random keys, e.g. "
                          "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    target = address or os.environ.get("RAY_ADDRESS")
    host = urlparse(target if "://" in target else f"ray://{target}").hostname if target else None
    loopback_store = loopback_adapter_store(recipe.adapters)
    if loopback_store and host and not is_loopback(host) and host != "auto":
        raise RecipeError(
            f"field 'adapters.endpoint_url': {loopback_store}, which replicas on other nodes of the cluster at "
            f"{target} cannot reach: set adapters.endpoint_url to an S3 endpoint every node reaches (null for AWS "
            "S3) and adapters.store_uri to a bucket there"
        )
    if s.host not in LOOPBACK_HOSTS and not keys and not s.allow_unauthenticated:
        env = f" or ${s.api_key_env}" if s.api_key_env else ""
        raise RecipeError(
            f"field 'server.host': refusing to bind {s.host!r} without an API key: set server.api_keys{env}, "
            "bind 127.0.0.1, or set server.allow_unauthenticated: true"
        )
    if recipe.engine.tool_call_parser:
        check_tool_call_parser(recipe.engine.tool_call_parser)
    adapters: dict[str, Path] = {}
    if not recipe.adapters.enabled:
        return adapters  # listed paths are ignored: nothing is uploaded or served
    for name, path in recipe.adapters.paths.items():
        found = resolve_path(path)
        config = found / "adapter_config.json" if found else None
        if config is None or not config.is_file():
            raise RecipeError(f"field 'adapters.paths.{name}': {path!r} is not a PEFT adapter directory")
        _check_rank(name, found, recipe.adapters.max_lora_rank)
        adapters[name] = found
    return adapters


def _check_rank(name: str, adapter_dir: Path, max_rank: int) -> None:
    """Refuse an adapter whose LoRA rank the engine was not started for (`adapters.max_lora_rank`)."""
    rank = adapter_rank(adapter_dir)
    if rank > max_rank:
        raise RecipeError(f"field 'adapters.max_lora_rank': adapter {name!r} has rank {rank}, "
                          f"above max_lora_rank {max_rank}")


def check_tool_call_parser(name: str) -> None:
    """Refuse a tool-call parser this vLLM does not have, listing those it has (unchecked if the list is unreadable)."""
    known = vllm_tool_parsers()
    if known is not None and name not in known:
        raise RecipeError(f"field 'engine.tool_call_parser': {name!r} is not one of vLLM's tool-call parsers; "
                          f"allowed: {', '.join(known)}")


def vllm_tool_parsers() -> list[str] | None:
    """The tool-call parsers vLLM registers, read from its source rather than imported: importing vLLM here would
    load thousands of modules and change this process's environment, which the embedded Ray it starts inherits."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "tool_parsers" / "__init__.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_TOOL_PARSERS_TO_REGISTER"
                                                for t in node.targets) and isinstance(node.value, ast.Dict):
            return sorted(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return None


@contextlib.contextmanager
def adapter_store(recipe: ServeRecipe,
                  adapters: dict[str, Path]) -> Iterator[tuple[str | None, S3Endpoint | None, dict[str, str]]]:
    """Upload adapters and yield (store URI or None, its S3 endpoint or None, environment for that endpoint); a local
    S3 endpoint lives as long."""
    a = recipe.adapters
    if not a.enabled:
        yield None, None, {}
        return
    with contextlib.ExitStack() as stack:
        if a.endpoint_url == "local":
            endpoint = stack.enter_context(LocalS3()).endpoint
        else:
            endpoint = S3Endpoint(a.endpoint_url)
        store = a.store_uri.rstrip("/")
        if store.startswith("s3://"):
            for name, path in adapters.items():
                upload_adapter(path, f"{store}/{name}", endpoint)
            if not adapters and endpoint.url is not None:
                ensure_prefix(store, endpoint)
        elif adapters:
            raise RecipeError(f"field 'adapters.store_uri': uploading is implemented for s3:// only, got {store!r}")
        yield store, endpoint, endpoint.env()


def build_spec(recipe: ServeRecipe, model_source: str, store: str | None, env: dict[str, str], keys: list[str],
               port: int | None = None):
    """The plain `cluster.serve.ServeSpec` for this recipe."""
    from cluster.serve import ServeSpec, key_hash

    r = recipe.resources
    return ServeSpec(
        model_id=recipe.engine.model_id,
        model_source=model_source,
        engine_kwargs={**serve_engine_kwargs(recipe), **serve_frontend_kwargs(recipe)},
        placement_group_config={"bundle_per_worker": serve_bundle_per_worker(recipe),
                                "strategy": r.placement_strategy},
        deployment_config=serve_deployment_config(recipe),
        env_vars={**serve_engine_env(recipe), **env},
        accelerator_type=r.accelerator_type,
        lora_uri=store,
        max_adapters_per_replica=recipe.adapters.max_adapters_per_replica,
        max_model_len=recipe.engine.max_model_len,
        host=recipe.server.host,
        port=port or recipe.server.port,
        api_key_hashes=sorted({key_hash(k) for k in keys}),
        cache_entries=recipe.cache.max_entries,
        ingress_replicas=recipe.server.ingress_replicas,
        ingress_cpus=SERVE_INGRESS_CPUS,
        cors_origins=list(recipe.server.cors_origins),
        route_prefix=recipe.server.route_prefix,
    )


@dataclass
class Served:
    """A running deployment: its base URL (`http://HOST:PORT/v1`) and base model id; `publish` adds an adapter while
    it serves (the engine loads `MODEL:NAME` from the adapter store on its first request, as it does at start)."""

    url: str
    model_id: str
    _store: str | None
    _endpoint: S3Endpoint | None
    _max_rank: int

    def publish(self, name: str, adapter_dir: str | Path) -> str:
        """Upload the PEFT adapter at `adapter_dir` to the store as NAME; returns the model id clients send."""
        if self._store is None or self._endpoint is None or not self._store.startswith("s3://"):
            raise RecipeError("field 'adapters.enabled': publishing an adapter needs an s3:// adapter store")
        _check_rank(name, Path(adapter_dir), self._max_rank)
        upload_adapter(Path(adapter_dir), f"{self._store}/{name}", self._endpoint)
        return f"{self.model_id}:{name}"


@contextlib.contextmanager
def serving(recipe: ServeRecipe, address: str | None = None, port: int | None = None) -> Iterator[Served]:
    """Deploy the recipe and yield it as `Served`; the app is deleted on exit."""
    keys = api_keys(recipe)
    adapters = check_before_start(recipe, keys, address)
    from cluster import runtime
    from cluster import serve as cluster_serve  # before connecting: importing Serve resets its loggers' levels
    from workloads.models.loading import resolve_model_path

    model_source = resolve_model_path(recipe.model)
    print(f"[llmc] {runtime.connect(address)}", flush=True)
    check_serving(recipe.adapters, model_source)  # before any upload or deployment

    with adapter_store(recipe, adapters) as (store, endpoint, env):
        spec = build_spec(recipe, model_source, store, env, keys, port)
        print(f"[llmc] deploying {spec.model_id} (engine start takes a minute on CPU) ...", flush=True)
        try:
            url = cluster_serve.start(spec)
            names = [spec.model_id] + [f"{spec.model_id}:{name}" for name in adapters]
            print(f"[llmc] serving models {', '.join(names)}", flush=True)
            print(f"[llmc] auth: {'bearer key required' if keys else 'none (loopback only)'}", flush=True)
            print(f"{READY_LINE} {url}", flush=True)
            yield Served(url, spec.model_id, store, endpoint, recipe.adapters.max_lora_rank)
        finally:
            print("[llmc] stopping ...", flush=True)
            cluster_serve.stop(spec.app_name)


def run(recipe: ServeRecipe, address: str | None = None, port: int | None = None,
        stop_event: threading.Event | None = None) -> None:
    """`llmc serve`: serve until `stop_event` is set, or Ctrl-C / SIGTERM raise KeyboardInterrupt (the
    connection installs that for SIGTERM); either way the app is deleted on the way out."""
    stop_event = stop_event or threading.Event()
    with serving(recipe, address, port):
        while not stop_event.wait(1.0):
            pass


class ServeProcess:
    """`llmc serve RECIPE` in a child process of its own session, for tests and benchmarks.

    Every output line is kept in `lines` (a reader thread drains the pipe, so the driver never blocks);
    `wait_ready` returns once the READY_LINE appears (`url` is then the API's base URL, route prefix included);
    `stop` sends Ctrl-C so the app is deleted.
    """

    def __init__(self, recipe: str | Path, port: int | None = None, overrides: list[str] = (),
                 env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.url: str | None = None
        command = [sys.executable, "-m", "workloads.cli", "serve", str(recipe), "--port", str(self.port)]
        for item in overrides:
            command += ["--set", item]
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith(READY_LINE):
                self.url = line.removeprefix(READY_LINE).strip()
                self._ready.set()

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the server answers; if it exits or times out first, stop it and raise with its log tail."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("llmc serve did not come up:\n" + "".join(self.lines[-60:]))

    def stop(self) -> None:
        """Ctrl-C (the driver deletes the app and stops its S3 endpoint), then SIGKILL if it hangs."""
        for sig, wait in ((signal.SIGINT, 120), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue
