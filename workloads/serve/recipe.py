"""The serving recipe (kind: serve): `llmc serve` and `llmc generate` read the same recipe; `EngineOptions` are the
vLLM knobs every engine of this project takes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from workloads.common.recipe import NAME_PATTERN, StrictModel
from workloads.models.recipe import ModelConfig

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class EngineOptions(StrictModel):
    """vLLM engine knobs every engine of this project takes (a serve recipe's `engine`, PPO/GRPO's `rl.engine`);
    continuous batching is the engine's, these bound it."""

    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs (engine workers) one engine shards over.")
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Most sequences batched together per engine step.")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="Tokens per engine step; null: vLLM's default.")
    kv_cache_gib: float = Field(1.0, gt=0, le=1024, description="CPU only: host RAM for the KV cache (GiB).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only: memory fraction for weights + KV.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    enforce_eager: bool = Field(True, description="No CUDA graphs / compilation: quicker start, slower steps (set "
                                                  "false on GPUs for CUDA graphs).")


class EngineConfig(EngineOptions):
    """A serve recipe's engine: the shared knobs, and what only a served model has (its name, context, seed,
    pipeline stages, tool-call parser)."""

    model_id: str = Field(
        "tiny", pattern=NAME_PATTERN, description="Name clients send as `model`; adapters: MODEL_ID:NAME."
    )
    pipeline_parallel_size: int = Field(1, ge=1, le=16, description="Pipeline stages per replica.")
    max_model_len: int = Field(512, ge=16, description="Context length: prompt plus generated tokens.")
    seed: int = Field(0, description="Engine sampling seed.")
    tool_call_parser: str | None = Field(
        None, min_length=1, description="vLLM's tool-call parser for the model's chat template (hermes for the tiny "
        "model, llama3_json for Llama 3.1+): chat requests with `tools` get the calls back as `tool_calls` (auto tool "
        "choice); null: such requests get 400. Checked against vLLM's parsers when `llmc serve` starts.")


# Resources Ray defines itself: a recipe asks for them through their own fields, never `resources.custom`.
_BUILT_IN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class ServeResourcesConfig(StrictModel):
    """Resources of each engine worker (one per tensor x pipeline rank) of one replica."""

    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0, description="Logical CPUs per engine worker.")
    gpus_per_worker: float = Field(1, gt=0, le=8, description="GPUs per engine worker when use_gpu is true.")
    accelerator_type: str | None = Field(None, description="e.g. H100: pin replicas to that GPU type.")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="How one replica's workers are placed; STRICT_PACK keeps TP on one node."
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine worker asks for, e.g. {serve_pool: 1}: replicas go only to "
                    "nodes started with them (`ray start --resources='{\"serve_pool\": 4}'`).",
    )

    @field_validator("custom")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        built_in = [name for name in value if name in _BUILT_IN_RESOURCES or name.startswith("accelerator_type:")]
        if built_in:
            raise ValueError(f"{built_in} have fields of their own (cpus_per_worker, gpus_per_worker, "
                             "accelerator_type): custom names only the resources a node is started with")
        bad = {name: amount for name, amount in value.items() if not name.strip() or not amount > 0}
        if bad:
            raise ValueError(f"each custom resource needs a name and an amount above 0, got {bad}")
        return value


class AutoscalingConfig(StrictModel):
    """Replica count and backpressure of the model deployment (Ray Serve autoscaling)."""

    min_replicas: int = Field(1, ge=0, le=256, description="Replicas kept even when idle (0: scale to zero).")
    max_replicas: int = Field(1, ge=1, le=256, description="Upper bound the autoscaler may reach.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start; null: min_replicas.")
    target_ongoing_requests: float = Field(8, gt=0, description="In-flight requests per replica to aim at.")
    upscale_delay_s: float = Field(10, ge=0, description="Load must persist this long before adding replicas.")
    downscale_delay_s: float = Field(120, ge=0, description="Idle time before removing replicas.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests one replica runs at once; beyond it they queue.")
    max_queued_requests: int = Field(
        64, ge=-1, description="Queue bound per caller; when full, clients get 503 at once (-1: unbounded)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError("target_ongoing_requests above max_ongoing_requests can never be reached")
        return self


def _safe_names(value: dict, what: str) -> dict:
    """`value` if its keys are safe names in paths and URLs (NAME_PATTERN), else ValueError naming the others."""
    bad = [name for name in value if not re.match(NAME_PATTERN, name)]
    if bad:
        raise ValueError(f"{what} {bad} may hold only letters, digits, '_', '.', '-', and not be . or ..")
    return value


class AdaptersConfig(StrictModel):
    """LoRA adapters served by name beside the base model, from an object store."""

    enabled: bool = Field(True, description="Serve LoRA adapters (vLLM enable_lora).")
    paths: dict[str, str] = Field(
        default_factory=dict, description="NAME: local PEFT adapter dir, uploaded to store_uri/NAME at start."
    )
    store_uri: str = Field("s3://llmc-adapters/tiny", description="Object-store folder with one folder per adapter.")
    endpoint_url: str | None = Field(
        "local", description="`local`: an S3 endpoint on 127.0.0.1 started on demand; null: the provider's; or a URL."
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank the engine accepts.")
    max_adapters_per_replica: int = Field(4, ge=1, description="Adapters one replica keeps loaded.")

    @field_validator("paths")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        return _safe_names(value, "adapter names")

    @model_validator(mode="after")
    def _store(self) -> AdaptersConfig:
        if not self.store_uri.startswith(("s3://", "gs://", "abfss://", "azure://")):
            raise ValueError("store_uri must be an object-store URI (s3://, gs://, abfss://, azure://)")
        if self.endpoint_url == "local" and not self.store_uri.startswith("s3://"):
            raise ValueError("endpoint_url `local` is an S3 endpoint: store_uri must start with s3://")
        return self


class PromotionGateConfig(StrictModel):
    """What a candidate must score through the live endpoint before `llmc promote` puts it behind its alias: the eval
    recipe's variant run once with the candidate's adapter and once with the champion's (the pipeline gate's shape:
    a bar, and/or beating the champion)."""

    eval: str = Field(..., description="An eval recipe (kind: eval): its test set, scorers and the variant below.")
    variant: str | None = Field(None, description="The eval recipe's variant whose prompt and sampling score each "
                                "version (its model replaced); null: the first.")
    set: list[str] = Field(default_factory=list, description="`--set`-style overrides of the eval recipe, e.g. "
                           "test_set.limit=20 or endpoint.api_key_env=NAME (the variable holding a key of this "
                           "endpoint).")
    metric: str = Field("accuracy", min_length=1, description="A column of the eval's variants table, higher is "
                        "better: accuracy (the first scorer's pass rate) or mean_SCORER.")
    min: float | None = Field(None, description="The candidate's metric must be at least this.")
    beats_champion_by: float | None = Field(None, description="The candidate's metric must be at least the current "
                                            "champion's plus this (0: not worse); none to compare with on the first "
                                            "promotion.")

    @model_validator(mode="after")
    def _has_a_bar(self) -> PromotionGateConfig:
        if self.min is None and self.beats_champion_by is None:
            raise ValueError(f"gate on {self.metric!r}: give min, beats_champion_by or both")
        return self


class PromotedModelConfig(StrictModel):
    """A registered model (MLflow) whose champion version this endpoint serves under a stable name."""

    served_as: str = Field("prod", pattern=NAME_PATTERN, description="Clients send ENGINE_MODEL_ID:SERVED_AS (e.g. "
                           "tiny:prod); `llmc promote` and `llmc rollback` switch what it answers with.")
    gate: PromotionGateConfig


class PromotionConfig(StrictModel):
    """Registered models served under stable names, their champion put behind each at start (`llmc promote`)."""

    tracking_uri: str | None = Field(None, description="MLflow store holding the registry; null: "
                                     "$MLFLOW_TRACKING_URI, else runs/mlflow.db.")
    models: dict[str, PromotedModelConfig] = Field(default_factory=dict, description="REGISTERED_MODEL: how it is "
                                                   "served and gated.")

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, PromotedModelConfig]) -> dict[str, PromotedModelConfig]:
        _safe_names(value, "registered model names")
        served = [m.served_as for m in value.values()]
        if len(set(served)) != len(served):
            raise ValueError(f"two models are served under one name: served_as {served}")
        return value


class ServerConfig(StrictModel):
    host: str = Field("127.0.0.1", description="HTTP bind address; anything but loopback needs an API key.")
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Accepted bearer keys (prefer api_key_env: recipes get committed)."
    )
    api_key_env: str | None = Field(
        "LLMC_API_KEYS", description="Environment variable with comma-separated accepted keys, added to api_keys."
    )
    allow_unauthenticated: bool = Field(False, description="Allow a non-loopback host with no key at all.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (e.g. https://app.example.com); empty: no cross-origin "
                    "access. Preflight requests are answered before the key check.",
    )
    ingress_replicas: int = Field(1, ge=1, le=64, description="Replicas of the HTTP router (cache is per replica).")
    route_prefix: str = Field(
        "/", pattern=r"^/([A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*)?$",
        description="Path the app answers under (`/smollm2` serves `/smollm2/v1/...`): another model can then be "
                    "served on the same cluster and port, each under its own prefix.",
    )


class CacheConfig(StrictModel):
    max_entries: int = Field(1024, ge=0, description="Deterministic (temperature 0) answers kept; 0 turns it off.")


class SamplingConfig(StrictModel):
    """Defaults of `llmc generate`; a prompt row may override each one."""

    max_tokens: int = Field(64, ge=1, description="Generated tokens per sample.")
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=64, description="Samples per prompt.")
    stop: list[str] = Field(default_factory=list, description="Stop sequences.")
    seed: int | None = Field(0, description="Per-request seed: same seed, same samples.")


class ServeRecipe(StrictModel):
    kind: Literal["serve"] = "serve"
    model: ModelConfig
    engine: EngineConfig = Field(default_factory=EngineConfig)
    resources: ServeResourcesConfig = Field(default_factory=ServeResourcesConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    generate: SamplingConfig = Field(default_factory=SamplingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> ServeRecipe:
        s, e = self.server, self.engine
        if (s.host not in LOOPBACK_HOSTS and not s.api_keys and not s.api_key_env and not s.allow_unauthenticated):
            raise ValueError(
                f"server.host {s.host!r} is not loopback and no API key source is set: set server.api_keys or "
                "server.api_key_env, or server.allow_unauthenticated: true to serve without keys"
            )
        if self.model.dtype == "float16" and not self.resources.use_gpu:
            raise ValueError("model.dtype float16 needs GPUs (resources.use_gpu: true); use float32 or bfloat16 on CPU")
        if self.model.name == "tiny" and e.max_model_len > self.model.tiny.max_position_embeddings:
            raise ValueError(f"engine.max_model_len ({e.max_model_len}) exceeds the tiny model's "
                             f"max_position_embeddings ({self.model.tiny.max_position_embeddings})")
        if self.promotion.models and not self.adapters.enabled:
            raise ValueError("promotion.models serves adapters: set adapters.enabled: true")
        clash = sorted({m.served_as for m in self.promotion.models.values()} & set(self.adapters.paths))
        if clash:
            raise ValueError(f"promotion.models: served_as {clash} is also an adapter of adapters.paths")
        if self.generate.max_tokens >= e.max_model_len:
            raise ValueError("generate.max_tokens must leave room for the prompt within engine.max_model_len")
        return self


class PromoteRecipe(StrictModel):
    """`kind: promote`: `llmc promote` as a recipe, the last stage of a pipeline: a registered version gated through
    the live endpoint that serves its model and, when it passes, put behind that model's stable name."""

    kind: Literal["promote"] = "promote"
    version: str = Field(..., pattern=r"^\S+@\S+$", description="MODEL@VERSION, e.g. "
                         "${stages.grpo.outputs.registered_version} (a stage run with run.register_as).")
    address: str | None = Field(None, description="The Ray cluster serving the endpoint; null: `llmc pipeline "
                                "--address`, else RAY_ADDRESS.")
    tracking_uri: str | None = Field(None, description="MLflow store of the registry; null: the one the endpoint "
                                     "was started with.")

    def output_dir(self, given: str | Path | None = None) -> Path:
        """Where the summary (the gate's scores, the switch) goes: `given` (a pipeline's stage directory), else
        runs/promote."""
        return Path(given or "runs/promote")
