"""Which model a benchmark measures, and where its results go.

Every benchmark takes `--model`: a real model by name (`smollm2-135m`, the default: SmolLM2-135M-Instruct, converted
once and cached by `workloads.models`), whose results go to a folder of their own (`bench/results/NAME/`), or the
tiny-model factory's models (`tiny`, and the bigger untrained ones each benchmark names), whose results stay where
they were committed (`bench/results/`). One folder holds one model's run, so every ratio in a file was measured in
that one run.
"""

from __future__ import annotations

from pathlib import Path

from workloads.models.gguf import NAMED_MODELS

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = "smollm2-135m"
REAL_MODELS = tuple(NAMED_MODELS)


def is_real(name: str) -> bool:
    """Whether `name` is a real model (converted from its GGUF), not a shape built by the tiny-model factory."""
    return name in REAL_MODELS


def results_dir(name: str) -> Path:
    """Where a run on model `name` writes its results: `bench/results/NAME/` for a real model, else `bench/results/`."""
    return RESULTS / name if is_real(name) else RESULTS


def real_model_dir(name: str) -> Path:
    """The converted directory of the real model `name` (built on first use, cached afterwards)."""
    from workloads.models.loading import resolve_model_path
    from workloads.models.recipe import ModelConfig

    return Path(resolve_model_path(ModelConfig(name=name)))


def parameter_count(config) -> int:
    """Parameters of a Llama-family `transformers` config: grouped-query attention and tied embeddings counted."""
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or h // heads)
    embeddings = v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + embeddings + h
