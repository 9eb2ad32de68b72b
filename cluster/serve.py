"""Serve a model on Ray Serve LLM (vLLM engine) behind an OpenAI-compatible ingress with our own concerns.

Ray Serve LLM does the engine, continuous batching, streaming, LoRA multiplexing, autoscaling and the
OpenAI routes; this module adds what it does not: API keys (a middleware that only ever sees key
hashes), a bounded response cache for deterministic requests (scoped per API key), request checks with clear 4xx
messages, `/health`, and its own metrics (`metrics.SERVE_COUNTERS`, beside Ray Serve's `ray_serve_*` and vLLM's
`ray_vllm_*`), and stable names (`tiny:prod`) that an alias table (`cluster.aliases`) points at an adapter, switched
while serving. `ServeSpec` is a plain description, built by `workloads.serve.deploy` from a recipe.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import ray
from fastapi import Request
from ray import serve
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from cluster import _ray_private, aliases, metrics, openai_checks

# Routes anyone may call: readiness must work for a load balancer that holds no key.
PUBLIC_PATHS = frozenset({"/health", "/-/healthz", "/-/routes"})
CACHE_HEADER = "x-llmc-cache"
# Fields that identify a request rather than shape its answer: left out of the cache key.
_NOT_IN_CACHE_KEY = {"request_id", "user", "stream", "stream_options"}
_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/cache/stats", "/health"})
# A 4xx's reason when the handler named none (`request.state.llmc_reason`).
_REASONS = {400: "invalid_request", 401: "api_key", 404: "not_found", 405: "method_not_allowed",
            422: "invalid_request"}


@dataclass
class ServeSpec:
    """Everything needed to deploy one model (and its adapters) as an OpenAI-compatible app."""

    model_id: str  # the name clients send as `model`
    model_source: str  # directory or hub id the engine loads
    engine_kwargs: dict[str, Any]
    placement_group_config: dict[str, Any]
    deployment_config: dict[str, Any]  # autoscaling_config, max_ongoing_requests, max_queued_requests
    env_vars: dict[str, str] = field(default_factory=dict)  # engine and ingress processes
    accelerator_type: str | None = None
    lora_uri: str | None = None  # object-store prefix holding one folder per adapter
    max_adapters_per_replica: int = 4
    max_model_len: int = 2048
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_hashes: list[str] = field(default_factory=list)  # sha256 hex; the keys never leave the driver
    cache_entries: int = 1024  # 0 turns the response cache off
    ingress_replicas: int = 1
    ingress_cpus: float = 0.5
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed; empty: none
    route_prefix: str = "/"  # one app per prefix on the cluster's one Serve HTTP port
    aliases: dict[str, str] = field(default_factory=dict)  # alias id (tiny:prod) -> the registered model it serves
    alias_entries: list[dict] = field(default_factory=list)  # what each alias points at when the app starts
    alias_info: dict[str, Any] = field(default_factory=dict)  # what `llmc promote` reads (store, registry, gates)

    @property
    def app_name(self) -> str:
        return "llmc" if self.route_prefix == "/" else "llmc-" + self.route_prefix.strip("/").replace("/", "-")

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}/v1"


def key_hash(key: str) -> str:
    """The form in which an API key travels to the cluster: a SHA-256 hex digest."""
    return hashlib.sha256(key.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Ingress: API keys, cache, checks
# ---------------------------------------------------------------------------------------------


class RequestMetricsMiddleware(BaseHTTPMiddleware):
    """Counts every answer by route and status, 401s, 4xx by reason and 503s (`metrics.SERVE_COUNTERS`)."""

    async def dispatch(self, request: Request, call_next):
        response = await call_next(request)
        path, code = request.url.path, response.status_code
        route = path if path in _ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        _count("llmc_serve_requests", route=route, code=str(code))
        if code == 401:
            _count("llmc_serve_unauthorized")
        if 400 <= code < 500:
            reason = getattr(request.state, "llmc_reason", None) or _REASONS.get(code, f"http_{code}")
            _count("llmc_serve_client_errors", reason=reason)
        if code == 503 and route != "/health":
            _count("llmc_serve_shed")
        return response


def _count(name: str, **tags: str) -> None:
    metrics.inc_counter(name, tags, description=metrics.SERVE_COUNTERS[name])


class ApiKeyMiddleware(BaseHTTPMiddleware):
    """401 for any non-public route without `Authorization: Bearer <key>` whose hash is allowed."""

    def __init__(self, app, key_hashes: frozenset[str]):
        super().__init__(app)
        self._hashes = key_hashes

    async def dispatch(self, request: Request, call_next):
        if not self._hashes or request.url.path in PUBLIC_PATHS:
            return await call_next(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = key_hash(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""
        if not any(hmac.compare_digest(digest, allowed) for allowed in self._hashes):
            # Never echo or log what was presented.
            return _error(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                          "authentication_error")
        request.state.llmc_key_hash = digest  # the response cache's scope: one tenant never sees another's hits
        return await call_next(request)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's {"detail": ...} errors (e.g. unknown model, 404) in the OpenAI error shape."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
    return _error(exc.status_code, str(exc.detail), kind, param="model" if exc.status_code == 404 else None)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(status_code=status, content=body)


class ResponseCache:
    """A bounded LRU of JSON answers keyed by the request's answer-shaping fields and the caller's scope (its API
    key's hash: a hit would tell one key holder what another asked), with counters."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def key(kind: str, body: CompletionRequest | ChatCompletionRequest, scope: str) -> str | None:
        """A key for a deterministic (temperature 0, non-streaming) request in `scope`; None for any other."""
        if not body.temperature == 0 or body.stream:  # None means the engine's default, not greedy
            return None
        fields = body.model_dump(mode="json", exclude_unset=True, exclude=_NOT_IN_CACHE_KEY)
        return hashlib.sha256(json.dumps([scope, kind, fields], sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        return None

    def put(self, key: str, content: dict) -> None:
        self._entries[key] = content
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries),
                "max_entries": self.max_entries, "evictions": self.evictions}


class LlmcIngress(OpenAiIngress):
    """Ray Serve LLM's OpenAI router plus request checks, the response cache, `/health` and cache stats."""

    def __init__(self, llm_deployments, model_cards, *, max_model_len: int, cache_entries: int, lora_enabled: bool,
                 app_name: str = "llmc", aliases_declared: dict[str, str] | None = None, **kwargs):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._lora_enabled = lora_enabled  # refuse prompt log-probabilities: they crash a LoRA engine
        self._engines = dict(llm_deployments)  # our own copies: the base class keeps these privately
        self._model_ids = sorted(model_cards)
        self._max_model_len = max_model_len
        self._cache = ResponseCache(cache_entries) if cache_entries > 0 else None
        self._aliases = aliases.AliasReader(app_name, aliases_declared) if aliases_declared else None
        self._cards = dict(model_cards)

    # Handlers keep their annotations: FastAPI reads the body's type from them.
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._answer("completions", super().completions, body, request, body.max_tokens, "max_tokens")

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        limit, name = (body.max_completion_tokens, "max_completion_tokens")
        if limit is None:
            limit, name = body.max_tokens, "max_tokens"
        return await self._answer("chat", super().chat, body, request, limit, name)

    async def models(self):
        """Ray Serve LLM's listing, plus each alias that points at something, with its target and version."""
        listing = await super().models()
        if self._aliases is None:
            return listing
        cards = [card.model_dump(mode="json") for card in listing.data]
        cards += [aliases.card(alias, self._base_card(alias)) for alias in await self._aliases.entries()]
        return JSONResponse({"object": "list", "data": cards})

    async def model_data(self, model: str):
        """One card: an alias's (with its target and version), or Ray Serve LLM's for any other name."""
        alias = await self._aliases.resolve(model) if self._aliases else None
        if alias is None:
            return await super().model_data(model)
        return JSONResponse(aliases.card(alias, self._base_card(alias)))

    def _base_card(self, alias: aliases.Alias) -> dict:
        base = self._cards.get(alias.target.split(":", 1)[0]) or next(iter(self._cards.values()))
        return base.model_dump(mode="json")

    async def health(self) -> Response:
        """200 once every engine answers its health check, 503 otherwise."""
        try:
            for handle in self._engines.values():
                await handle.options(stream=False).check_health.remote()
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return _error(503, f"engine not healthy: {type(exc).__name__}", "service_unavailable")
        return JSONResponse({"status": "ok", "models": self._model_ids})

    async def cache_stats(self) -> Response:
        """Hit/miss counters of this ingress replica's response cache."""
        return JSONResponse(self._cache.stats() if self._cache else {"enabled": False})

    async def _answer(self, kind: str, handler, body, request: Request, max_tokens: int | None, param: str) -> Response:
        problem = self._check(kind, body, max_tokens, param)
        if problem is not None:
            request.state.llmc_reason = json.loads(problem.body)["error"]["param"]  # counted by the middleware
            return problem
        alias = await self._aliases.resolve(body.model) if self._aliases else None
        if self._aliases and body.model in self._aliases.declared and alias is None:
            request.state.llmc_reason = "model"
            return _error(404, f"{body.model} serves registered model {self._aliases.declared[body.model]!r}, which "
                               "has no champion yet: `llmc promote MODEL@VERSION` puts one behind it", param="model")
        if alias is not None:
            body.model = alias.target  # before the cache key: a switch must never be answered from the old target
        key = ResponseCache.key(kind, body, getattr(request.state, "llmc_key_hash", "")) if self._cache else None
        if key is not None:
            cached = self._cache.get(key)
            _count("llmc_serve_cache_misses" if cached is None else "llmc_serve_cache_hits")
            if cached is not None:
                return JSONResponse(aliases.named(cached, alias), headers={CACHE_HEADER: "hit"})
        response = await handler(body, request)  # Ray Serve LLM's public handler
        if key is not None and isinstance(response, JSONResponse) and response.status_code == 200:
            self._cache.put(key, json.loads(response.body))
            response.headers[CACHE_HEADER] = "miss"
        return aliases.renamed(response, alias) if alias is not None else response

    def _check(self, kind: str, body, max_tokens: int | None, param: str) -> JSONResponse | None:
        """Reject what the engine would reject late or vaguely, naming the field."""
        if max_tokens is not None and max_tokens < 1:
            return _error(400, f"{param} must be at least 1, got {max_tokens}", param=param)
        if max_tokens is not None and max_tokens > self._max_model_len:
            return _error(400, f"{param}={max_tokens} exceeds the model's context length "
                               f"({self._max_model_len} tokens, prompt included)", param=param)
        found = openai_checks.problem(kind, body.model_dump(mode="json", exclude_unset=True),
                                      lora_enabled=self._lora_enabled)
        if found is not None:
            return _error(400, found[1], param=found[0])
        return None


_ModelList, _ModelCard = _ray_private.model_list_types()
# The routes this app serves: Ray Serve LLM's OpenAI routes (as its own endpoint map declares them), plus ours.
_ENDPOINTS = {
    "models": lambda app: app.get("/v1/models", response_model=_ModelList),
    "model_data": lambda app: app.get("/v1/models/{model:path}", response_model=_ModelCard),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "health": lambda app: app.get("/health"),
    "cache_stats": lambda app: app.get("/v1/cache/stats"),
}


# ---------------------------------------------------------------------------------------------
# Building and running the app
# ---------------------------------------------------------------------------------------------


def llm_config(spec: ServeSpec) -> LLMConfig:
    """The Ray Serve LLM config of the model deployment (engine, placement, autoscaling, LoRA)."""
    lora = None
    if spec.lora_uri:
        lora = {"dynamic_lora_loading_path": spec.lora_uri.rstrip("/"),
                "max_num_adapters_per_replica": spec.max_adapters_per_replica}
    return LLMConfig(
        model_loading_config={"model_id": spec.model_id, "model_source": spec.model_source},
        engine_kwargs=copy.deepcopy(spec.engine_kwargs),
        placement_group_config=copy.deepcopy(spec.placement_group_config),
        deployment_config=copy.deepcopy(spec.deployment_config),
        runtime_env={"env_vars": dict(spec.env_vars)} if spec.env_vars else None,
        accelerator_type=spec.accelerator_type,
        lora_config=lora,
        log_engine_metrics=True,  # vLLM's engine metrics on Ray's export (`ray_vllm_*`); needs log stats on
    )


def lora_enabled(spec: ServeSpec) -> bool:
    """Whether the engine runs with LoRA (adapters from the store, or `enable_lora` in its options)."""
    return bool(spec.lora_uri or spec.engine_kwargs.get("enable_lora"))


def build_app(spec: ServeSpec):
    """The Serve application: one LLMServer deployment behind an `LlmcIngress` deployment."""
    config = llm_config(spec)
    server = build_llm_deployment(config)
    app = _ray_private.stock_openai_app()  # Ray Serve LLM's FastAPI app: error handling, request ids
    # The stock app lets any origin call with credentials: ours allows only the recipe's origins, if any.
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    app.add_middleware(ApiKeyMiddleware, key_hashes=frozenset(spec.api_key_hashes))  # outermost: runs first
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(RequestMetricsMiddleware)  # outermost but CORS: it sees every answer, 401s too
    if spec.cors_origins:  # added last, so outermost: a preflight is answered before the key check
        app.add_middleware(CORSMiddleware, allow_origins=list(spec.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])
    ingress_cls = make_fastapi_ingress(LlmcIngress, endpoint_map=_ENDPOINTS, app=app)
    options = {
        "name": "ingress",
        "num_replicas": spec.ingress_replicas,
        "max_ongoing_requests": 4096,  # the engine deployment sheds load; the router must not
        "ray_actor_options": {"num_cpus": spec.ingress_cpus,
                              "runtime_env": {"env_vars": dict(spec.env_vars)} if spec.env_vars else {}},
    }
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments={spec.model_id: server},
        model_cards={spec.model_id: _ray_private.model_card(spec.model_id, config)},
        lora_paths={spec.model_id: config.lora_config.dynamic_lora_loading_path} if spec.lora_uri else {},
        max_model_len=spec.max_model_len,
        cache_entries=spec.cache_entries,
        lora_enabled=lora_enabled(spec),
        app_name=spec.app_name,
        aliases_declared=dict(spec.aliases),
    )


def start(spec: ServeSpec, timeout_s: float = 900) -> str:
    """Deploy the app on the connected Ray cluster and wait until it runs; returns the base URL."""
    serve.start(http_options={"host": spec.host, "port": spec.port})
    bound = _ray_private.serve_http_port()
    if bound is not None and bound != spec.port:
        raise RuntimeError(f"Serve already runs on this cluster with HTTP port {bound}, not {spec.port}: "
                           "use that port or stop the other app first")
    if spec.aliases:  # before the ingress: its replicas read the table from their first request
        aliases.create(spec.app_name, spec.aliases, {**spec.alias_info, "url": spec.url}, spec.alias_entries)
    serve.run(build_app(spec), name=spec.app_name, route_prefix=spec.route_prefix, blocking=False)
    _wait_running(spec.app_name, timeout_s)
    return spec.url


def _wait_running(app_name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"serving app {app_name!r} failed: {app.message or _deployment_messages(app)}")
        time.sleep(0.5)
    raise TimeoutError(f"serving app {app_name!r} not running after {timeout_s:.0f}s")


def _deployment_messages(app) -> str:
    return "; ".join(f"{name}: {d.message}" for name, d in app.deployments.items() if d.message)


def status(app_name: str = "llmc") -> dict:
    """Application and deployment states, with replica counts (the autoscaler's decisions show here)."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return {"app": app_name, "status": "NOT_STARTED", "deployments": {}}
    return {
        "app": app_name,
        "status": str(app.status.value if hasattr(app.status, "value") else app.status),
        "deployments": {
            name: {
                "status": str(getattr(d.status, "value", d.status)),
                "trigger": str(getattr(d.status_trigger, "value", d.status_trigger)),
                "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
                "message": d.message,
            }
            for name, d in app.deployments.items()
        },
    }


def stop(app_name: str = "llmc") -> None:
    """Delete the app (its replicas and engines); Serve itself keeps running for other apps."""
    if ray.is_initialized():
        serve.delete(app_name)
        aliases.remove(app_name)
