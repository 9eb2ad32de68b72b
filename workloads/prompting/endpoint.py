"""The endpoint a prompt-engineering run talks to: any OpenAI-compatible URL, or our served model for the run.

With no `base_url`, `llmc serve` runs the recipe's serve recipe in a child process on a free loopback port with a
fresh API key, and is stopped (the app deleted) when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workloads.common.paths import resolve_path
from workloads.common.recipe import RecipeError
from workloads.kinds import load_recipe
from workloads.prompting.client import AsyncLLMClient
from workloads.prompting.recipe import EndpointConfig
from workloads.serve.recipe import ServeRecipe

SERVE_TIMEOUT_S = 900


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ends in /v1
    api_key: str | None  # read on the driver: trials on other nodes do not share its environment
    model: str  # sent when a variant names none
    fingerprint: str  # what answers: a changed model or adapter must not be served from the response cache

    def client(self, config: EndpointConfig) -> AsyncLLMClient:
        return AsyncLLMClient(self.base_url, model=self.model, api_key=self.api_key,
                              max_concurrency=config.max_concurrency, max_retries=config.max_retries,
                              timeout_s=config.timeout_s, cache=config.cache, cache_namespace=self.fingerprint,
                              batch_prompts=config.batch_prompts)


@contextlib.contextmanager
def open_endpoint(config: EndpointConfig, address: str | None = None) -> Iterator[Endpoint]:
    """The configured endpoint, or the served model started for the duration of the `with` block."""
    if config.base_url is not None:
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if config.api_key_env and not key:
            raise RecipeError(f"field 'endpoint.api_key_env': the variable {config.api_key_env} is not set")
        yield Endpoint(config.base_url.rstrip("/"), key, config.model, f"{config.base_url}|{config.model}")
        return
    from workloads.serve.deploy import ServeProcess

    recipe_path = resolve_path(config.serve)
    serve_recipe = load_recipe(recipe_path, kind="serve")
    key, env = "llmc-" + secrets.token_urlsafe(24), dict(os.environ)
    if address:
        env["RAY_ADDRESS"] = address
    key_env = serve_recipe.server.api_key_env or "LLMC_API_KEYS"
    env[key_env] = key
    overrides = [] if serve_recipe.server.api_key_env else [f"server.api_key_env={key_env}"]
    print(f"[llmc] starting {config.serve} for this run ...", flush=True)
    server = ServeProcess(recipe_path, overrides=overrides, env=env)
    try:
        server.wait_ready(timeout_s=SERVE_TIMEOUT_S)
        print(f"[llmc] serving at {server.base_url}/v1", flush=True)
        yield Endpoint(f"{server.base_url}/v1", key, config.model, _fingerprint(serve_recipe))
    finally:
        server.stop()


@contextlib.contextmanager
def opened_client(config: EndpointConfig, address: str | None = None,
                  endpoint: Endpoint | None = None) -> Iterator[AsyncLLMClient]:
    """A client of `endpoint`, or of the configured one opened for the block (`open_endpoint`); closed after it."""
    with contextlib.nullcontext(endpoint) if endpoint else open_endpoint(config, address) as opened:
        client = opened.client(config)
        try:
            yield client
        finally:
            client.close()


def _fingerprint(serve_recipe: ServeRecipe) -> str:
    """The served model and adapters, by path and file contents' size and time (cheap, and changes on retraining)."""
    from workloads.models.loading import resolve_model_path

    parts = [serve_recipe.model.model_dump_json()]
    dirs = [Path(resolve_model_path(serve_recipe.model))]
    dirs += [Path(p) for p in (resolve_path(v) for v in serve_recipe.adapters.paths.values()) if p]
    for folder in dirs:
        for file in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if file.is_file():
                stat = file.stat()
                parts.append(f"{file}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
