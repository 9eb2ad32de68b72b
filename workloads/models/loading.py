"""Loading a model and its tokenizer (any model: the tiny one, a converted GGUF, a hub id or a directory), with
bitsandbytes quantization for QLoRA."""

from __future__ import annotations

from pathlib import Path

import torch

from workloads.models.recipe import ModelConfig, QuantizationConfig
from workloads.models.tiny import build_tiny_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def resolve_model_path(cfg: ModelConfig) -> str:
    """A directory or hub id for `from_pretrained`; builds the tiny model, or converts a real model's GGUF, on first
    use."""
    from workloads.models.gguf import resolve_gguf_model

    if cfg.name == "tiny" and cfg.gguf is None:
        return str(build_tiny_model(cfg.tiny))
    if (converted := resolve_gguf_model(cfg.name, cfg.gguf)) is not None:
        return converted
    local = Path(cfg.name).expanduser()
    return str(local.resolve()) if local.exists() else cfg.name


def load_tokenizer(path: str, revision: str | None = None, chat_template: str | None = None):
    """The tokenizer of `path` (at `revision`), with `chat_template` replacing its own when given."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str,
    dtype: str = "float32",
    quantization: QuantizationConfig | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """A causal LM from `path`; 4-bit bitsandbytes weights when `quantization` is given."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch_dtype(dtype), "revision": revision}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        compute = torch_dtype(quantization.compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=compute,
            # DeepSpeed shards what it sees; storage in the compute dtype lets ZeRO-3 partition 4-bit weights.
            bnb_4bit_quant_storage=compute,
        )
        kwargs["device_map"] = {"": device or "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization is None and device is not None:
        model.to(device)
    if quantization is not None:
        _keep_4bit_layout(model)
    return model


def _keep_4bit_layout(model) -> None:
    """bitsandbytes repacks 4-bit weights in place on the first eval-mode CPU forward (AVX512-BF16 path);
    with non-uint8 storage that repacking cannot be undone and `state_dict()` (checkpoints) then fails."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
